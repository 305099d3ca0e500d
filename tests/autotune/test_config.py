"""TrialConfig validation, round trips, and the CLI flags generated from it."""

from __future__ import annotations

import argparse

import pytest

from autotune.config import TrialConfig, add_config_arguments, config_from_args
from autotune.errors import ConfigError
from backends import summaries


def test_defaults_are_valid_and_total_threads():
    config = TrialConfig(workers=4, threads_per_worker=2)
    assert config.total_threads == 8
    assert config.generation.greedy and config.generation.max_new_tokens == 64


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"workers": 0}, "workers must be a whole number >= 1, got 0"),
        ({"threads_per_worker": 1.5}, "threads_per_worker must be a whole number >= 1, got 1.5"),
        (
            {"quant": "q3_x"},
            "quant must be one of f16, q8_0, q5_k_m, q4_k_m, q4_1, q4_0, got 'q3_x'",
        ),
        ({"dtype": "fp8"}, "dtype must be one of float32, bfloat16, float16, got 'fp8'"),
        ({"gpu_layers": -2}, "gpu_layers must be -1 (all) or a whole number >= 0, got -2"),
        ({"placement": "cuda0"}, "'cuda0' is not a device"),
        ({"pinning": "numa"}, "pinning must be one of none, compact, spread, got 'numa'"),
        ({"workers": 2, "stages": 2}, "workers (2) and stages (2) cannot both be above 1"),
        ({"backend": "pipeline", "boundaries": "0-3,4-7"}, "--partition custom and --boundaries"),
        ({"backend": "pipeline", "partition": "custom"}, "--partition custom and --boundaries"),
        ({"backend": "pipeline", "stage_memory_gb": 2.0}, "the cap of --partition memory"),
        (
            {"backend": "pipeline", "partition": "memory", "stage_memory_gb": -1.0},
            "stage_memory_gb must be > 0",
        ),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ],
)
def test_validation_names_field_allowed_and_given(changes, message):
    with pytest.raises(ConfigError) as error:
        TrialConfig(**changes)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"backend": "vllm"},
            "backend must be one of llamacpp, hf, ddp, pipeline, fake, got 'vllm'",
        ),
        ({"fault": "crash"}, "fault (AUTOTUNE_FAULT) is not a setting of the llamacpp backend"),
        ({"stages": 2}, "stages (PIPELINE_STAGES) is not a setting of the llamacpp backend"),
        ({"kv_cache": False}, "kv_cache (AUTOTUNE_KV_CACHE) is not a setting of the llamacpp"),
        ({"backend": "hf", "quant": "q4_0"}, "quant (MODEL_QUANT) is not a setting of the hf"),
        ({"dtype": "bfloat16"}, "dtype (TORCH_DTYPE) is not a setting of the llamacpp backend"),
        ({"backend": "hf", "workers": 2}, "PARALLEL_WORKERS) is not a setting of the hf backend"),
    ],
)
def test_a_backend_refuses_the_fields_it_does_not_read(changes, message):
    from backends import check_config

    with pytest.raises(ConfigError) as error:
        check_config(TrialConfig(**changes))
    assert message in str(error.value)


def test_every_backend_accepts_its_own_fields():
    from backends import check_config

    check_config(TrialConfig(backend="fake", workers=2, fault="crash"))
    check_config(TrialConfig(backend="llamacpp", workers=3, quant="q4_0", pinning="spread"))
    check_config(TrialConfig(backend="ddp", workers=2, dtype="bfloat16"))
    check_config(
        TrialConfig(backend="pipeline", stages=2, partition="custom", boundaries="0-3,4-7")
    )


def test_pipeline_processes_are_its_stages():
    config = TrialConfig(backend="pipeline", stages=3, threads_per_worker=2)
    assert config.processes == 3 and config.total_threads == 6


def test_pipeline_switches_on_the_command_line():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, summaries())
    flags = "--backend pipeline --stages 2 --partition custom --boundaries 0-13,14-29"
    args = parser.parse_args([*flags.split(), "--no-kv-cache"])
    config = config_from_args(args)
    assert config.kv_cache is False and config.boundaries == "0-13,14-29"
    assert config_from_args(parser.parse_args(["--backend", "pipeline"])).kv_cache is True


def test_quant_is_case_insensitive():
    assert TrialConfig(quant="Q4_K_M").quant == "q4_k_m"


def test_dict_round_trip_and_unknown_fields():
    config = TrialConfig(backend="fake", workers=2, batch_size=8, fault="hang", seed=3)
    assert TrialConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown config field\\(s\\): bogus"):
        TrialConfig.from_dict({**config.to_dict(), "bogus": 1})


def test_cli_flags_come_from_the_fields():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, summaries())
    args = parser.parse_args(
        [
            "--backend",
            "hf",
            "--threads",
            "2",
            "--batch-size",
            "8",
            "--dtype",
            "bfloat16",
            "--no-chat-template",
            "--temperature",
            "0.5",
        ]
    )
    config = config_from_args(args)
    assert config == TrialConfig(
        backend="hf",
        threads_per_worker=2,
        batch_size=8,
        dtype="bfloat16",
        chat_template=False,
        temperature=0.5,
    )
    assert "one of f16, q8_0" in parser.format_help()


def test_collective_timeout_must_be_a_finite_number_of_seconds(monkeypatch):
    from backends.torch.torchrun import collective_timeout_s

    for bad in ("nan", "inf", "-1", "soon"):
        monkeypatch.setenv("AUTOTUNE_COLLECTIVE_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="AUTOTUNE_COLLECTIVE_TIMEOUT_S"):
            collective_timeout_s()
    monkeypatch.setenv("AUTOTUNE_COLLECTIVE_TIMEOUT_S", "4.5")
    assert collective_timeout_s() == 4.5


def test_the_naive_baseline_prefills_with_every_cpu_as_llama_cpp_python_does(machine):
    from autotune.knobs import Target
    from autotune.topology import detect
    from backends.llamacpp import LlamaCppBackend, engine_settings

    topology = detect(machine("epyc_16c32t"), probe_gpus=False)
    naive = LlamaCppBackend.naive(Target(topology, layers=30))
    # llama-cpp-python: n_threads = cpu_count() // 2, n_threads_batch = cpu_count()
    assert (naive["threads_per_worker"], naive["prefill_threads"]) == (16, 32)
    settings = engine_settings(TrialConfig(**naive))
    assert (settings["threads"], settings["prefill_threads"]) == (16, 32)
    assert engine_settings(TrialConfig(threads_per_worker=3))["prefill_threads"] == 3
