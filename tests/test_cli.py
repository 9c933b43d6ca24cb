"""The command line: help that reads right, and the thread count every subcommand chooses and prints."""

import pytest
import torch

from dora_diffusion.cli import build_parser, main


def test_train_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert "%(" not in out and "option_strings" not in out and "Traceback" not in out
    assert "~4% slower" in " ".join(out.split())  # the text itself, '%' included
    assert "train --output outputs/toy-dora --resume latest" in out


@pytest.mark.parametrize(
    "command",
    [
        ["train"],
        ["compare"],
        ["demo"],
        ["app"],
        ["analyze", "run"],
        ["export", "--adapter", "a", "--format", "kohya", "--out", "o"],
        ["verify", "--adapter", "a"],
    ],
)
def test_every_subcommand_takes_threads(command):
    assert build_parser().parse_args([*command, "--threads", "3"]).threads == 3
    assert build_parser().parse_args(command).threads is None
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--threads", "0"])


def test_the_chosen_thread_count_is_set_and_printed(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["verify", "--adapter", str(tmp_path / "missing.safetensors"), "--threads", "2"]) == 2
        captured = capsys.readouterr()
        assert "torch threads: 2 (--threads)" in captured.out and "missing.safetensors" in captured.err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
