"""The README's library example runs as written (with a tiny loader standing in for yours)."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_own_loop_example_runs():
    text = README.read_text()
    section = text[text.index("## RecursiveMix in your own loop"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=g),
               torch.randint(0, 100, (4,), generator=g)) for _ in range(3)]
    ns = {"loader": loader, "epochs": 2}
    exec(compile(code, str(README), "exec"), ns)
    policy = ns["policy"]
    assert policy.history is not None and policy.history.shape == (4, 3, 32, 32)
    assert torch.isfinite(ns["loss"])


def test_setup_commands_are_two_and_match_ci():
    text = README.read_text()
    setup = text[text.index("## Set up"):text.index("## Quick start")]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2 and "rmix train" in commands[0] and "pytest" in commands[1]
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1].split("&& ", 2)[-1] in ci  # CI runs the README's test command
