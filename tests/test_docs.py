"""The docs cannot rot: every `rlaif run ...` / `tune run ...` command README.md and docs/*.md show
still composes with its recipe's checks (a dry config composition, nothing runs)."""

import re
import shlex
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from omegaconf import OmegaConf

from rlaif_recipes import cli
from rlaif_recipes import config as rlaif_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALIASES = tuple(name.replace("_", "-") for name in cli.recipe_names() if "_" in name)
STARTS = ("rlaif run ", "tune run ", *(f"rlaif {alias} " for alias in ALIASES), *(f"rlaif {alias}`" for alias in ALIASES))


def _commands(text: str) -> List[str]:
    """Each command in a ```bash block (continuations joined, VAR=... and $VAR filled in) or in an
    inline code span (which may wrap over lines)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        env: Dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            assignment = re.match(r"^([A-Z])=(.*)$", line)
            if assignment:  # M="model=..." or M=$(rlaif get-model ...)
                value = assignment.group(2)
                env[assignment.group(1)] = "/models/M" if value.startswith("$(") else shlex.split(value)[0]
            elif line.startswith(STARTS):
                for name, value in env.items():
                    line = re.sub(rf"\${name}\b", value, line)
                found.append(line)
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        span = " ".join(span.split())
        template = "NAME" in span or span.endswith(" ...") or span.startswith("tune run") and "--config" not in span  # a form
        if (span + " ").startswith(STARTS) and not template and "$" not in span:
            found.append(span)
    return found


COMMANDS = [(page.name, command) for page in PAGES for command in _commands(page.read_text())]


def _recipe_and_overrides(command: str) -> Tuple[str, str, List[List[str]]]:
    """(recipe, config, one override list per run) as `rlaif` / `tune run` would call the recipe."""
    words = shlex.split(command)
    if words[0] == "tune":
        config = words[words.index("--config") + 1]
        overrides = [w for w in words[2:] if "=" in w and not w.startswith("-")]
        return Path(words[2]).stem, config, [overrides]
    words = words[1:] if words[1] == "run" else ["run", words[1].replace("-", "_"), *words[2:]]
    rest = words[1:]
    while rest and rest[0].startswith("--") and rest[0] not in ("--config", "--multirun", "--debug"):  # torchrun flags
        rest = rest[2:]
    rest = [w for w in rest if w != "--debug"]
    config = None
    if "--config" in rest:
        i = rest.index("--config")
        config, rest = rest[i + 1], rest[:i] + rest[i + 2 :]
    multirun = "-m" in rest
    args = [w for w in rest if w != "-m"]
    recipe, overrides = args[0].replace("-", "_"), args[1:]
    if config and config.endswith(".yaml") and not (ROOT / config).is_file():  # a copy made with `rlaif cp RECIPE FILE`
        config = recipe
    return recipe, config or recipe, cli._sweep(overrides) if multirun else [overrides]


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 20 and {page for page, _ in COMMANDS} >= {"real-models.md", "recipes.md", "people.md", "judges.md"}


@pytest.mark.parametrize("page,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_command_the_docs_show_composes(page: str, command: str) -> None:
    recipe, config, runs = _recipe_and_overrides(command)
    if recipe == "full_finetune_single_device":  # torchtune's own recipe: a plain config, its keys must exist
        base = OmegaConf.load(ROOT / config)
        for override in runs[0]:
            node, key = base, override.split("=", 1)[0]
            for part in key.split("."):
                assert part in node.keys(), f"{page}: {command}: no key {key} in {config}"
                node = node._get_node(part)
        return
    assert recipe in cli.recipe_names(), f"{page}: {command}: no recipe {recipe}"
    module = __import__(f"rlaif_recipes.recipes.{recipe}", fromlist=["_"])
    schema = next(v for k, v in vars(module).items() if k.endswith("Settings") and v.__module__ == module.__name__)
    for overrides in runs:
        rlaif_config.load(config, overrides, schema)
