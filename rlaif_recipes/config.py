"""Hydra composition behind torchtune's `--config NAME_OR_PATH key=value ...` command line.

`tune run <recipe>.py --config online_dpo sampler=torchtune optimizer.lr=1e-6` composes
conf/online_dpo.yaml with its defaults list (config groups mirror the code: `sampler=vllm` is
conf/sampler/vllm.yaml, whose `_component_` is rlaif_recipes.samplers.VLLMSampler). Objects are
still built with torchtune's `config.instantiate`. Before any model loads, the composed config is
checked: unknown group options and keys, wrong types and missing required values each fail with
one line that says what to change.
"""

import collections.abc
import contextlib
import functools
import inspect
import os
import re
import sys
import typing
from contextvars import ContextVar
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from rlaif_recipes.errors import (
    ConfigError,
    OutputError,
    RecipeError,
    debug,
    disk_full_error,
    one_line,
    os_error_line,
)
from rlaif_recipes.files import atomic_write_text
from rlaif_recipes.redact import REDACTED, SECRET_KEY, SECRET_MAPPINGS, redact_text


def _find_conf_dir() -> Path:
    installed = Path(__file__).resolve().parent / "conf"  # a wheel ships conf/ inside the package
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "conf"


CONF_DIR = _find_conf_dir()
ASSETS = Path(__file__).resolve().parent / "assets"
GROUPS = ("model", "sampler", "judge", "rubric", "loss", "data", "pairs")
# Plain torchtune configs in conf/, for torchtune's own recipes (`tune run full_finetune_single_device
# --config conf/sft.yaml`): no config groups, no recipe of ours reads them, so they are not offered
# as configs of ours (`rlaif ls` lists them apart).
TORCHTUNE_CONFIGS = ("sft",)


def asset_path(name: str) -> str:
    """Absolute path of a file the package ships: `${asset:xstest/xstest_prompts.csv}` in yaml."""
    path = ASSETS / name
    if not path.exists():
        raise FileNotFoundError(f"no packaged asset '{name}'; available: {sorted(p.name for p in ASSETS.iterdir())}")
    return str(path)


OmegaConf.register_new_resolver("asset", asset_path, replace=True)


def config_names() -> List[str]:
    """Top-level configs of our recipes (one per recipe, plus variants in subfolders that are not
    groups); the plain torchtune ones (TORCHTUNE_CONFIGS) are left out."""
    names = []
    for p in sorted(CONF_DIR.rglob("*.yaml")):
        rel = p.relative_to(CONF_DIR)
        name = str(rel.with_suffix(""))
        if rel.parts[0] not in GROUPS and name not in TORCHTUNE_CONFIGS:
            names.append(name)
    return names


def group_options(group: str) -> List[str]:
    return sorted(str(p.relative_to(CONF_DIR / group).with_suffix("")) for p in (CONF_DIR / group).rglob("*.yaml"))


def resolve_config(config: str) -> Tuple[Path, str]:
    """A config name (`online_dpo`, `models/qwen2_5_1_5b`) or a yaml path -> (directory, name)."""
    path = Path(config)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {config} does not exist; pass an existing yaml or one of: {', '.join(config_names())}")
        return path.resolve().parent, path.stem
    if (CONF_DIR / f"{config}.yaml").is_file():
        return CONF_DIR, config
    raise ConfigError(f"unknown config '{config}'; use a yaml path or one of: {', '.join(config_names())}")


def load(config: str, overrides: List[str], schema: Optional[type] = None) -> DictConfig:
    """Compose `config` with Hydra overrides, then check it (see module docstring)."""
    config_dir, name = resolve_config(config)
    parse_overrides(overrides)  # a malformed one is named here, not in Hydra's traceback
    hydra_overrides = list(overrides)
    if config_dir != CONF_DIR:  # a user's copy still finds the package's config groups
        hydra_overrides.append(f"hydra.searchpath=[file://{CONF_DIR}]")
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name=name):
            cfg = compose(name, overrides=hydra_overrides, return_hydra_config=True)
    except MissingConfigException as e:
        raise ConfigError(_missing_option_message(e, overrides)) from None
    except (ConfigCompositionException, OmegaConfBaseException) as e:
        raise ConfigError(_override_message(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_message(e)) from None
    choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra/")}
    with open_dict(cfg):
        del cfg["hydra"]
    cfg = validate(cfg, schema)
    with open_dict(cfg):
        cfg.config_choices = choices  # which option each group took, saved with the run
    return cfg


def validate(cfg: DictConfig, schema: Optional[type] = None) -> DictConfig:
    """Missing values, the recipe's top-level schema, and every `_component_`'s signature."""
    missing = sorted(_missing_keys(cfg, ""))
    if missing:
        raise ConfigError(
            f"missing required value(s): {', '.join(missing)}; set them on the command line "
            f"(e.g. {missing[0]}=...) or in the config"
        )
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve an interpolation: {_first_line(e)}") from None
    _check_env_names(cfg, "")
    if schema is not None:
        cfg = _apply_schema(cfg, schema)
    _check_components(cfg, "")
    check_ranges(cfg)
    return cfg


# Value ranges of keys any recipe may have, whatever component reads them (a value that is no number
# fails too): torchtune's DPOLoss takes a negative beta without a word (and trains the preferences
# backwards), torch's AdamW answers lr="abc" with a comparison error, a sampler would see its
# settings only at the first sample, after the engine and the model have started, and online_dpo
# its max_seq_len only at the first trained pair, after a step has sampled and judged.
RANGES: Tuple[Tuple[str, Callable[[Any], bool], str], ...] = (
    ("sampler.temperature", lambda v: v >= 0, "must be >= 0 (0: greedy; 0.7-1.0 for varied pairs)"),
    ("sampler.top_p", lambda v: 0 < v <= 1, "the nucleus mass must be in (0, 1] (1.0: off)"),
    ("sampler.max_tokens", lambda v: v >= 1, "new tokens per reply must be >= 1"),
    ("sampler.tensor_parallel_size", lambda v: v >= 1, "GPUs per vLLM engine must be >= 1 (1: one GPU, or the CPU)"),
    ("loss.beta", lambda v: v > 0, "the pull towards the reference must be > 0 (0.1 is typical for DPO)"),
    ("loss.gamma", lambda v: v > 0, "the margin scale must be > 0 (0.1 is typical)"),
    ("loss.label_smoothing", lambda v: 0 <= v < 0.5, "the share of labels taken as flipped must be in [0, 0.5)"),
    ("optimizer.lr", lambda v: v > 0, "the learning rate must be a number > 0 (e.g. 5.0e-6)"),
    ("lr_scheduler.num_warmup_steps", lambda v: v >= 0, "warm-up steps must be >= 0 (0: none)"),
    ("clip_grad_norm", lambda v: v > 0, "the gradient-norm cap must be > 0 (1.0 is typical; null: no clipping); a cap <= 0 zeroes or reverses every gradient"),
    ("distributed_timeout_s", lambda v: v > 0, "a collective's wait must be > 0 seconds (1800 is typical)"),
    ("max_seq_len", lambda v: v >= 2, "tokens per sequence must be >= 2, room for a prompt token and a reply token (online_dpo: null = no cut)"),
)


def check_ranges(cfg: DictConfig, ranges: Sequence[Tuple[str, Callable[[Any], bool], str]] = RANGES, *, null_ok: bool = True) -> None:
    """Each (key, ok, need) of `ranges`: a number that `ok` accepts, else one line; a key that is
    absent or null passes where `null_ok` (RANGES: a recipe without that setting). A recipe checks
    its own keys with its own table."""
    for key, ok, need in ranges:
        value = OmegaConf.select(cfg, key, default=None)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (value is not None or not null_ok) and not (number and ok(value)):
            raise ConfigError(f"{key}={value}: {need}; fix it in the config or with {key}=...")


def parse(schema: Optional[type] = None) -> Callable:
    """Decorator for a recipe's main: like torchtune's `config.parse`, but Hydra-composed.

    Config errors exit with one line on stderr before the recipe starts; so does any
    `RecipeError` the recipe raises later (see `rlaif_recipes.errors`), and a directory the run
    claimed new is removed again if it holds nothing but the run's record. The `schema` dataclass
    (a recipe's `...Settings`) only checks the config: the recipe gets the DictConfig itself, whose
    nested nodes torchtune's `config.instantiate` builds.
    """

    def decorator(recipe_main: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(recipe_main)
        def wrapper() -> Any:
            from rlaif_recipes import run_dir  # it imports this module

            cfg = None
            try:
                config, overrides = split_argv(sys.argv[1:])
                cfg = load(config, overrides, schema)
                return recipe_main(cfg)
            except RecipeError as e:
                run_dir.discard_unused_claim()  # a refused run leaves no run.json behind to puzzle a later one
                if debug():
                    raise
                sys.exit(one_line(e))
            except Exception as e:  # a full disk is expected too; anything else is a bug
                full = disk_full_error(e)
                if full is None:
                    raise
                run_dir.discard_unused_claim()
                if debug():
                    raise
                where = f"output_dir={cfg.output_dir}" if cfg is not None and "output_dir" in cfg else "a file"
                sys.exit(f"{OutputError.kind}: {os_error_line(full, where)}")
            finally:
                run_dir.forget_claim()

        return wrapper

    return decorator


def build(spec: Any, key: str = "") -> Any:
    """A nested component inside an instantiated object's arguments (torchtune's `instantiate`
    passes nested nodes as plain dicts): a `{_component_: ...}` mapping is built, a dotted path
    string is imported, anything else is returned as it is. `key` (e.g. "judge.rule") names the
    setting in the one-line error when a path does not import."""
    if isinstance(spec, (dict, DictConfig)) and "_component_" in spec:
        kwargs = {k: build(v, f"{key}.{k}") if isinstance(v, (dict, DictConfig)) and "_component_" in v else v for k, v in spec.items() if k != "_component_"}
        component = _import(spec["_component_"], f"{key}._component_")
        with _building_at(key):
            return component(**kwargs)
    if isinstance(spec, str) and "." in spec:
        return _import(spec, key)
    return spec


def instantiate(node: DictConfig, key: str, *args: Any, **kwargs: Any) -> Any:
    """torchtune's `config.instantiate` of the setting at `key` (e.g. "safe_prompts"). One data
    component serves several settings (`prompt_dataset` is `data` in online_dpo, `safe_prompts` in
    evaluate), so its one-line errors name the key through `built_at`, not a fixed one."""
    from torchtune import config as tune_config

    with _building_at(key):
        return tune_config.instantiate(node, *args, **kwargs)


_BUILT_AT: ContextVar[str] = ContextVar("rlaif_built_at", default="")


def built_at(default: str) -> str:
    """The config key of the component being built (set by `instantiate` and `build`), for its
    error messages; `default` when it is called directly, outside a recipe."""
    return _BUILT_AT.get() or default


@contextlib.contextmanager
def _building_at(key: str) -> Iterator[None]:
    token = _BUILT_AT.set(key)
    try:
        yield
    finally:
        _BUILT_AT.reset(token)


def _component(path: str) -> Any:
    """The object at a dotted path, as torchtune's `config.instantiate` finds it. Imported here:
    torchtune's import takes seconds, and `rlaif` commands that only compose configs never need it."""
    from torchtune.config._utils import _get_component_from_path

    return _get_component_from_path(path)


def _import(path: str, key: str) -> Any:
    try:
        return _component(path)
    except Exception:
        raise ConfigError(f"{key or 'a component'}={path}: cannot import it; give a dotted path module.name that exists") from None


def parse_overrides(overrides: List[str]) -> List[Any]:
    """Hydra's parse of `key=value` overrides; one that does not parse is named by its key only (its
    value may hold a key: `judge.base_url=http://host/v1?api_key=...`) with how to quote it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for override in overrides:
        try:
            parsed += parser.parse_overrides([override])
        except OverrideParseException as e:
            key = override.partition("=")[0]
            raise ConfigError(
                f"cannot parse the override of {key} ({_first_line(e)}): a value with '=', spaces, brackets or commas must be "
                f"quoted, with the quotes kept from the shell: \"{key}='VALUE'\"; the value is not shown (it may hold a key)"
            ) from None
    return parsed


def split_argv(argv: List[str]) -> Tuple[str, List[str]]:
    if "--config" not in argv or argv.index("--config") == len(argv) - 1:
        raise ConfigError("--config is required: pass a config name (see `rlaif ls`) or a yaml path")
    i = argv.index("--config")
    rest = argv[:i] + argv[i + 2 :]
    flags = [a for a in rest if a.startswith("--")]
    if flags:
        raise ConfigError(f"unsupported flag(s) {flags}; use --config and key=value overrides")
    return argv[i + 1], rest


# ---- saving -----------------------------------------------------------------------------------

_SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.I)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def redacted(cfg: DictConfig) -> Dict[str, Any]:
    """Plain copy with secret-named keys (and every value of a header mapping), any value holding
    a secret env var's value, and the secrets inside URLs redacted."""
    secrets = {v for k, v in os.environ.items() if _SECRET_ENV.search(k) and len(v) >= 8}

    def walk(node: Any, key: str = "", hidden: bool = False) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, str(k), hidden or str(k) in SECRET_MAPPINGS) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, key, hidden) for v in node]
        if not isinstance(node, str):
            return node
        pasted = key.endswith("_env") and not _ENV_NAME.match(node)
        if hidden or pasted or SECRET_KEY.search(key) or any(s in node for s in secrets):
            return REDACTED
        return redact_text(node)

    return walk(OmegaConf.to_container(cfg, resolve=True))


def save(cfg: DictConfig, output_dir: str, filename: str = "config.yaml") -> Path:
    """Write the composed config (secrets redacted) atomically into the run's output directory."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / filename, OmegaConf.to_yaml(OmegaConf.create(redacted(cfg))))


# ---- checks -----------------------------------------------------------------------------------


def _missing_keys(node: Any, path: str) -> List[str]:
    """Keys still `???` (interpolations are not followed, so each gap is named once, where it is)."""
    if isinstance(node, ListConfig):
        return [m for i in range(len(node)) for m in _missing_keys(node._get_node(i), f"{path}[{i}]")]
    if not isinstance(node, DictConfig):
        return []
    found = []
    for key in node.keys():
        child = f"{path}.{key}" if path else str(key)
        if OmegaConf.is_missing(node, key):
            found.append(child)
        elif not OmegaConf.is_interpolation(node, key):
            found += _missing_keys(node._get_node(key), child)
    return found


def _check_env_names(node: Any, path: str) -> None:
    """`*_env` keys name an environment variable; a pasted key is refused without echoing it."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _check_env_names(item, f"{path}[{i}]")
    elif isinstance(node, DictConfig):
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            if str(key).endswith("_env") and isinstance(value, str) and not _ENV_NAME.match(value):
                raise ConfigError(
                    f"'{child}' must be the NAME of an environment variable (like OPENAI_API_KEY), and this value is "
                    "not a variable name (a pasted key?); it is not shown or saved: export the key and set "
                    f"{child}=VARIABLE_NAME"
                )
            _check_env_names(value, child)


def _apply_schema(cfg: DictConfig, schema: type) -> DictConfig:
    assert is_dataclass(schema)
    known = {f.name for f in fields(schema)} | {"config_choices"}
    unknown = sorted(set(cfg.keys()) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {unknown} for this recipe; valid top-level keys: {', '.join(sorted(known - {'config_choices'}))}"
        )
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        if f.name in cfg and not _type_ok(cfg[f.name], hints[f.name]):
            raise ConfigError(_type_message(f.name, cfg[f.name], hints[f.name]))
    return cfg


def _check_components(node: Any, path: str) -> None:
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _check_components(item, f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    if "_component_" in node:
        _check_signature(node, path)
    for key, value in node.items():
        _check_components(value, f"{path}.{key}" if path else str(key))


def _check_signature(node: DictConfig, path: str) -> None:
    target = node["_component_"]
    try:
        component = _component(target)
    except Exception:
        raise ConfigError(f"{path}._component_: cannot import '{target}'; check the dotted path (module.attribute)") from None
    params, hints, takes_any = _parameters(component)
    for key, value in node.items():
        if key == "_component_":
            continue
        if key not in params:
            if not takes_any:
                raise ConfigError(
                    f"unknown key '{path}.{key}' for {target}; valid keys: {', '.join(sorted(params)) or 'none'}"
                )
            continue
        hint = hints.get(key)
        if hint is not None and not _type_ok(value, hint):
            raise ConfigError(_type_message(f"{path}.{key}", value, hint))


def _parameters(component: Any) -> Tuple[Dict[str, inspect.Parameter], Dict[str, Any], bool]:
    """Named parameters of a callable; for classes, follow **kwargs up the base classes."""
    targets = [c.__init__ for c in inspect.getmro(component) if "__init__" in vars(c)] if inspect.isclass(component) else [component]
    params: Dict[str, inspect.Parameter] = {}
    hints: Dict[str, Any] = {}
    for fn in targets:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return params, hints, True
        try:
            fn_hints = typing.get_type_hints(fn)
        except Exception:
            fn_hints = {}
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(name, p)
                if name in fn_hints:
                    hints.setdefault(name, fn_hints[name])
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            return params, hints, False
    return params, hints, True


def _type_ok(value: Any, hint: Any) -> bool:
    """Loose check of a config value against a type hint; unknown hints pass."""
    if hint is Any or isinstance(value, DictConfig) and "_component_" in value:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (ListConfig, list, tuple)):
            return False
        item = args[0] if args and (len(args) == 1 or args[-1] is Ellipsis) else Any
        return all(_type_ok(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, (DictConfig, dict))
    return True


def _type_message(key: str, value: Any, hint: Any) -> str:
    shown = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
    return f"'{key}' must be {shown}, got {value!r} ({type(value).__name__}); fix it in the config or with {key}=..."


def _missing_option_message(e: MissingConfigException, overrides: List[str]) -> str:
    text = str(e)
    m = re.search(r"In '[^']*': Could not find '([^']+)'", text) or re.search(r"Could not find '([^']+)'", text)
    target = m.group(1) if m else text.splitlines()[0]
    group, _, option = target.rpartition("/")
    if group in GROUPS or (CONF_DIR / group).is_dir():
        return f"unknown option '{option}' for config group '{group}'; choose one of: {', '.join(group_options(group))}"
    return _first_line(e)


def _override_message(e: Exception) -> str:
    text = str(e)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        inner = re.search(r"full_key: (\S+)", str(e.__cause__ or ""))
        if inner and inner.group(1) != key:
            return (
                f"the value given for '{key}' adds key '{inner.group(1)}', which its config does not have; "
                f"check the spelling, or replace the whole value with ++{key}=..."
            )
        return f"unknown config key '{key}'; check the spelling, or add a new key with +{key}=..."
    m = re.search(r"Could not append to config. An item is already at '([^']+)'", text)
    if m:
        return f"key '{m.group(1)}' already exists; override it without the leading +"
    return _first_line(e)


def _yaml_message(e: "yaml.YAMLError") -> str:
    """A yaml file that does not parse: where (file, line, column) and what the parser expected."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark else "a config file"
    what = ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or _first_line(e)
    return f"{where}: not valid yaml ({what}); fix the file there"


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else repr(e)
