"""The `psp` command line: misconfiguration fails fast with what to do; demo and inspect work."""
from __future__ import annotations

import os

import pytest

from jobs.cli import main


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from jobs.demo import make_sample_inputs

    folder = tmp_path_factory.mktemp("inputs")
    make_sample_inputs(folder, n_good=1)
    return str(folder)


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2  # also when the parser generated from the declarations refuses a flag
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_missing_checkpoint_says_what_to_pass(capsys, inputs, tmp_path):
    _fails(capsys, ["invert", inputs, str(tmp_path / "out"), "--checkpoint", str(tmp_path / "nope.pt")],
           "nope.pt", "does not exist", "--checkpoint")


def test_task_checkpoint_mismatch(capsys, inputs, tmp_path, tiny_checkpoint):
    _fails(capsys, ["invert", inputs, str(tmp_path / "out"), "--checkpoint", tiny_checkpoint,
                    "--task", "celebs_seg_to_face"], "celebs_seg_to_face", "input_nc=3", "drop --task")


def test_super_resolution_needs_a_factor(capsys, inputs, tmp_path, tiny_checkpoint):
    _fails(capsys, ["invert", inputs, str(tmp_path / "out"), "--checkpoint", tiny_checkpoint,
                    "--task", "celebs_super_resolution"], "--resize-factor")


def test_latent_mask_outside_the_model(capsys, inputs, tmp_path, tiny_checkpoint):
    # The tiny checkpoint (32 px) has 8 styles: the README's 8-17 does not exist there.
    _fails(capsys, ["invert", inputs, str(tmp_path / "out"), "--checkpoint", tiny_checkpoint,
                    "--mix", "2", "--latent-mask", "8-17"], "outside 0-7")


def test_gpu_precision_on_cpu_fails_before_any_work(capsys, inputs, tmp_path, tiny_checkpoint):
    _fails(capsys, ["invert", inputs, str(tmp_path / "out"), "--checkpoint", tiny_checkpoint,
                    "--device", "cpu", "--precision", "fp16"], "--precision fp16 needs a GPU", "fp32")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_and_missing_input(capsys, inputs, tmp_path, tiny_checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(capsys, ["invert", inputs, str(blocker), "--checkpoint", tiny_checkpoint], "is a file")
    _fails(capsys, ["invert", str(tmp_path / "missing"), str(tmp_path / "out"), "--checkpoint", tiny_checkpoint],
           "missing", "does not exist")


def test_bad_storage_options_json_is_a_usage_error(inputs, tmp_path, tiny_checkpoint, capsys):
    for command in (["invert", inputs, str(tmp_path / "o"), "--checkpoint", tiny_checkpoint],
                    ["inspect", str(tmp_path / "o")], ["vacuum", str(tmp_path / "o")]):
        _fails(capsys, [*command, "--storage-options", "{nope"], "--storage-options", "not valid JSON")


@pytest.mark.slow
def test_demo_then_inspect(ray_cluster, capsys, tmp_path):
    """`psp demo` end to end (few faces to keep it quick), then `psp inspect` on its output."""
    out = tmp_path / "demo-out"
    assert main(["demo", "--output", str(out), "--inputs", str(tmp_path / "in"), "--photos", "2"]) == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "--checkpoint /path/to/psp_ffhq_encode.pt" in text
    assert "ok=2" in text and "decode_error=3" in text and "no_face=1" in text
    assert main(["inspect", str(out)]) == 0
    report = capsys.readouterr().out
    assert "status counts" in report and "no_face" in report


def test_fast_alignment_is_opt_in_and_validated(capsys, inputs, tmp_path, tiny_checkpoint):
    from jobs.cli import build_parser, config_from_args

    argv = ["invert", inputs, str(tmp_path / "out"), "--checkpoint", tiny_checkpoint]
    assert config_from_args(build_parser().parse_args(argv)).align_detect_size is None
    fast = build_parser().parse_args(argv + ["--align-detect-size", "1024"])
    assert config_from_args(fast).align_detect_size == 1024
    # 70 px once passed the CLI and then failed in every alignment actor (FaceAligner needs >= 80).
    _fails(capsys, argv + ["--align-detect-size", "70"], "--align-detect-size", "80 px")


@pytest.mark.parametrize("field,value,needle", [
    ("align_detect_size", 70, "80 px"),       # FaceAligner's own check
    ("resize_factor", 200, "out of range"),   # the task transform's own check
    ("mix_alpha", 1.5, "<= 1"),
    ("task", "ffhq_nope", "ffhq_nope"),
    ("images", "gif", "png"),
])
def test_the_resolver_refuses_what_a_stage_would_refuse(tmp_path, tiny_checkpoint, field, value, needle):
    """Library callers skip argparse: resolve_config runs the same declared checks before Ray."""
    from pipelines.config import ConfigError, InvertConfig, resolve_config

    config = InvertConfig(input=str(tmp_path), output=str(tmp_path / "out"), checkpoint=tiny_checkpoint,
                          **{field: value})
    with pytest.raises(ConfigError, match=needle):
        resolve_config(config)


def test_nightly_takes_every_run_option_of_invert(tmp_path):
    from jobs.cli import build_parser
    from jobs.nightly import _config_from_args

    args = build_parser().parse_args([
        "nightly", "in/", "out/", "--checkpoint", "sr.pt", "--resize-factor", "8", "--mix", "2",
        "--latent-mask", "4-7", "--align-detect-size", "1024", "--storage-options", '{"anon": true}',
    ])
    config = _config_from_args(args)
    assert (config.resize_factor, config.mix, config.latent_mask, config.align_detect_size) == (8, 2, "4-7", 1024)
    assert config.storage_options == {"anon": True} and (config.input, config.output) == ("in/", "out/")


def test_n_iters_and_keep_iterations_only_for_restyle(inputs, tmp_path, tiny_checkpoint):
    """pSp and e4e encode in one pass: --n-iters / --keep-iterations with them fail before any
    work; with a ReStyle checkpoint they resolve (default n_iters: the family's, 5)."""
    from pipelines.config import (
        ConfigError,
        InvertConfig,
        read_checkpoint_info,
        resolve_config,
    )
    from psp_core.testing import random_e4e_checkpoint, random_restyle_checkpoint

    e4e = random_e4e_checkpoint(str(tmp_path / "e4e.pt"), output_size=32, seed=0)
    out = str(tmp_path / "out")

    def config(checkpoint, **kw):
        return InvertConfig(input=inputs, output=out, checkpoint=checkpoint, **kw)

    with pytest.raises(ConfigError, match=r"--n-iters only applies to ReStyle.*psp checkpoint.*drop --n-iters"):
        resolve_config(config(tiny_checkpoint, n_iters=3))
    with pytest.raises(ConfigError, match=r"--keep-iterations only applies to ReStyle.*e4e checkpoint"):
        resolve_config(config(e4e, keep_iterations=True))
    with pytest.raises(ConfigError, match="n.iters"):
        resolve_config(config(e4e, n_iters=0))
    assert not (tmp_path / "out").exists()

    restyle = random_restyle_checkpoint(str(tmp_path / "restyle.pt"), output_size=32,
                                        encoder_type="ProgressiveBackboneEncoder", seed=0)
    info = read_checkpoint_info(restyle)
    assert (info.family, info.n_iters, info.input_nc, info.n_styles) == ("restyle_e4e", 5, 3, 8)
    assert read_checkpoint_info(e4e).family == "e4e" and read_checkpoint_info(tiny_checkpoint).family == "psp"
    assert resolve_config(config(restyle)).n_iters == 5
    resolved = resolve_config(config(restyle, n_iters=2, keep_iterations=True))
    assert resolved.n_iters == 2 and resolved.config.keep_iterations


def test_metrics_on_car_inputs_fail_fast(inputs, tmp_path):
    """--metrics compares 256x256 face crops: a 192x256 car checkpoint refuses it before any work."""
    from pipelines.config import ConfigError, InvertConfig, resolve_config
    from psp_core.testing import random_e4e_checkpoint

    cars = random_e4e_checkpoint(str(tmp_path / "e4e_cars.pt"), output_size=64, dataset_type="cars_encode", seed=0)
    config = InvertConfig(input=inputs, output=str(tmp_path / "out"), checkpoint=cars, metrics=True)
    with pytest.raises(ConfigError, match=r"--metrics.*cars_encode takes 192x256.*drop --metrics"):
        resolve_config(config)
    resolved = resolve_config(InvertConfig(input=inputs, output=str(tmp_path / "out"), checkpoint=cars))
    assert (resolved.task, resolved.align, resolved.checkpoint.family) == ("cars_encode", "none", "e4e")


def test_ray_noise_is_dropped_from_stderr_and_nothing_else(capfd):
    """What C++ writes to file descriptor 2 during a command passes through in order, except Ray's
    known-harmless "constructor arguments in the object store" line (printed once per run)."""
    from jobs.cli import without_ray_noise

    with without_ray_noise():
        os.write(2, b"first line\n")
        os.write(2, b"[2026 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(AlignFaces))' "
                    b"has constructor arguments in the object store and max_restarts > 0. If the ...\n")
        os.write(2, b"from python\n")
        os.write(2, b"a real error\nno newline at the end")
    err = capfd.readouterr().err
    assert err == "first line\nfrom python\na real error\nno newline at the end"
