"""Every method option's range is checked before any work: values that cannot act or that the
float32 math cannot hold are UserErrors naming the option and its valid range."""
import dataclasses
import math

import pytest

import fasterase
from fasterase.errors import UserError
from fasterase.methods import REGISTRY, ant, esd, uce


def _no_run(monkeypatch, method):
    def run(*a, **k):
        raise AssertionError(f"{method} ran")

    monkeypatch.setitem(REGISTRY, method, dataclasses.replace(REGISTRY[method], run=run))


@pytest.mark.parametrize("config,options,needle", [
    (uce.UCEConfig, {"erase_scale": 1e300}, r"erase_scale must be > 0 and <= 1000000 \(a number\), got 1e\+300"),
    (uce.UCEConfig, {"preserve_scale": -1.0}, "preserve_scale must be >= 0"),
    (uce.UCEConfig, {"lam": 1e-300}, "lam must be >= 1e-06"),
    (uce.UCEConfig, {"lam": math.inf}, "lam must be"),
    (uce.UCEConfig, {"text_kv": 1}, "text_kv must be true or false"),
    (esd.ESDConfig, {"seed": -1}, r"seed must be >= 0 and <= 4294967295 \(an integer\), got -1"),
    (esd.ESDConfig, {"seed": 2**32}, "seed must be"),
    (esd.ESDConfig, {"guidance": -5.0}, "guidance must be >= 1 and <= 100"),
    (esd.ESDConfig, {"guidance": 0.5}, "guidance must be >= 1"),
    (esd.ESDConfig, {"eta": 1e300}, "eta must be > 0 and <= 1000000"),
    (esd.ESDConfig, {"lr": 5.0}, "lr must be > 0 and <= 1"),
    (esd.ESDConfig, {"lr": 0.0}, "lr must be > 0"),
    (esd.ESDConfig, {"steps": 0}, "steps must be >= 1"),
    (esd.ESDConfig, {"rank": 0}, "rank must be >= 1"),
    (esd.ESDConfig, {"batch_size": 10**6}, "batch_size must be >= 1 and <= 1024"),
    (esd.ESDConfig, {"sample_steps": 5000}, "sample_steps must be >= 1 and <= 1000"),
    (esd.ESDConfig, {"max_skipped_steps": -1}, "max_skipped_steps must be >= 0"),
    (esd.ESDConfig, {"checkpoint": " "}, "checkpoint must be a file path"),
    (esd.ESDConfig, {"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
    (ant.ANTConfig, {"lambda3": 1e300}, "lambda3 must be >= 0 and <= 1000000"),
    (ant.ANTConfig, {"lambda1": -1.0}, "lambda1 must be >= 0"),
    (ant.ANTConfig, {"t_split": math.nan}, "strictly between 0"),
    (ant.ANTConfig, {"seed": -1}, "seed must be >= 0"),
    (ant.ANTConfig, {"guidance": -5.0}, "guidance must be >= 1"),
    (ant.ANTConfig, {"lr": 2.0}, "lr must be > 0 and <= 1"),
    (ant.ANTConfig, {"steps": 0}, "steps must be >= 1"),
    (ant.ANTConfig, {"saliency_threshold": 1e300}, "saliency_threshold must be > 0 and <= 1000000"),
    (ant.ANTConfig, {"saliency_prompts": 0}, "saliency_prompts must be >= 1"),
    (ant.ANTConfig, {"saliency_seeds": 0}, "saliency_seeds must be >= 1"),
    (ant.ANTConfig, {"preserve_scale": 1e300}, "preserve_scale must be >= 0 and <= 1000000"),
    (ant.ANTConfig, {"lam": 0.0}, "lam must be >= 1e-06"),
    (ant.ANTConfig, {"split": 1}, "split must be true or false"),
    (ant.ANTConfig, {"sample_steps": 0}, "sample_steps must be >= 1"),
    (ant.ANTConfig, {"eta": 0.0}, "eta must be > 0"),
])
def test_out_of_range_options_are_refused(config, options, needle):
    with pytest.raises(UserError, match=needle):
        config(**options)


def test_defaults_and_bounds_are_accepted():
    for config in (uce.UCEConfig, esd.ESDConfig, ant.ANTConfig):
        config()
    esd.ESDConfig(seed=2**32 - 1, guidance=1.0, lr=1.0, batch_size=1024, sample_steps=1000, eta=1e6)
    ant.ANTConfig(lambda1=0.0, lambda2=0.0, lambda3=1e6, lam=1e-6, saliency_threshold=1e6)
    uce.UCEConfig(lam=1e-6, erase_scale=1e6, preserve_scale=0.0)


@pytest.mark.parametrize("method,options,needle", [
    ("esd", {"seed": -1}, "seed must be >= 0"),
    ("esd", {"guidance": -5}, "guidance must be >= 1"),
    ("uce", {"erase_scale": 1e300}, "erase_scale must be > 0"),
])
def test_the_api_refuses_before_any_work(monkeypatch, method, options, needle):
    _no_run(monkeypatch, method)
    with pytest.raises(UserError, match=needle):
        fasterase.erase("toy-sd", "circle", method=method, **options)
