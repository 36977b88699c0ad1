"""Render a pytest-benchmark JSON file as the markdown table of bench/RESULTS.md.

    pytest bench --benchmark-only --benchmark-json=bench.json && python bench/report.py bench.json
"""
import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows = sorted(data["benchmarks"], key=lambda b: (b["extra_info"].get("device", ""), b["extra_info"].get("op", ""),
                                                      b["stats"]["median"]))
    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
          f"python {data['machine_info']['python_version']}, {data['datetime']}")
    print()
    print("| device | op | implementation | elements | median ms | GB/s |")
    print("|---|---|---|---|---|---|")
    for b in rows:
        info = b["extra_info"]
        print(f"| {info.get('device')} | {info.get('op')} | {info.get('impl')} | {info.get('elements')} | "
              f"{b['stats']['median'] * 1e3:.2f} | {info.get('GB/s')} |")


if __name__ == "__main__":
    main(sys.argv[1])
