"""Every ``tl-spikesink`` line of README.md names a subcommand whose --help works."""

import re
from pathlib import Path

import pytest

from tl_spikesink.cli import main

README = Path(__file__).resolve().parents[3] / "README.md"
COMMANDS = sorted(set(re.findall(r"^tl-spikesink (\w+)", README.read_text(), re.M)))


def test_the_readme_lists_the_subcommands():
    assert {"scan", "report", "intervene", "ablate", "sae", "paper", "streaming"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_each_readme_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and f"tl-spikesink {command}" in capsys.readouterr().out
