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
    # on a GPU, each figure as a fraction of the measured device-to-device copy (the roofline)
    copy = next((b["extra_info"]["GB/s"] for b in rows if b["extra_info"].get("op") == "copy"), None)
    print("| device | op | implementation | elements | median ms per call | GB/s | of copy |")
    print("|---|---|---|---|---|---|---|")
    for b in rows:
        info = b["extra_info"]
        share = f"{info['GB/s'] / copy:.0%}" if copy and info.get("device") == "cuda" else ""
        print(f"| {info.get('device')} | {info.get('op')} | {info.get('impl')} | {info.get('elements')} | "
              f"{b['stats']['median'] / info.get('calls', 1) * 1e3:.3f} | {info.get('GB/s')} | {share} |")


if __name__ == "__main__":
    main(sys.argv[1])
