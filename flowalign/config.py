"""Config schemas and loading: dataclasses with help strings, YAML files and dotted overrides.

Every config is a dataclass whose fields are declared with :func:`field`, so each carries a
default and a help string (``describe`` turns them into the CLI's ``--help`` table). Loading
goes through OmegaConf structured configs, which type-check and convert values::

    cfg = load_config(SampleConfig, "configs/sample.yaml", ["num_steps=30", "prompts=[a cat,a dog]"])

Unknown keys, ill-typed values and malformed overrides raise :class:`ConfigError`, whose message
names the dotted key, says what was expected and lists the valid keys (with a "did you mean").
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

__all__ = [
    "ConfigError",
    "SampleConfig",
    "check_choices",
    "describe",
    "field",
    "load_config",
    "save_config",
    "to_yaml",
]

SAMPLERS = ("ode", "flow-sde", "dance-sde", "cps")
DTYPES = ("float32", "bfloat16", "float16")

_KEY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class ConfigError(ValueError):
    """A config that cannot be loaded: unknown key, wrong type, bad override or invalid value."""


def field(default: Any, help: str, choices: typing.Sequence[Any] | None = None) -> Any:
    """A dataclass field with a default and a help string (and optionally the allowed values).

    Mutable defaults (lists, dicts, dataclass instances) are copied per instance; a dataclass
    *type* as default means "a fresh instance of it", so nested configs read
    ``optim: OptimConfig = field(OptimConfig, "Optimizer settings.")``.
    """
    if not help:
        raise ValueError("field(...) needs a non-empty help string: every config key is documented.")
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(cfg: Any, prefix: str = "") -> None:
    """Raise ConfigError if a field declared with ``choices`` holds a value outside them.

    Call it from a schema's ``__post_init__``; ``load_config`` also runs it on every nested config.
    A list-valued field is checked element by element; ``None`` is always allowed (it means "default").
    ``prefix`` is the dotted path of a nested config, used in the message.
    """
    for f in dataclasses.fields(cfg):
        allowed = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if not allowed or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v not in allowed:
                hint = _did_you_mean(str(v), [str(c) for c in allowed])
                options = ", ".join(map(str, allowed))
                raise ConfigError(f"{prefix}{f.name}={v!r} is not allowed; choose one of: {options}.{hint}")


# ----------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SampleConfig:
    """`flowalign sample`: generate images/videos from prompts with one of the flow samplers."""

    model: str = field("tiny-sd3", "Bundled model name, local diffusers directory, or Hugging Face hub id.")
    prompts: list[str] = field([], "Prompts to sample, e.g. prompts='[a red circle,two blue squares]'.")
    prompts_file: str | None = field(None, "Text file with one prompt per line (added after `prompts`).")
    num_steps: int | None = field(None, "Number of sampling steps (the model scheduler's own sigma schedule); "
                                        "null = the model's own (20, or a distilled student's).")
    sampler: str | None = field(
        None,
        "Step rule: ode (deterministic Euler), flow-sde (Flow-GRPO), dance-sde (DanceGRPO), "
        "cps (coefficients-preserving sampling); null = the model's own (ode, or a distilled student's).",
        choices=SAMPLERS,
    )
    eta: float | None = field(None, "Noise level of the stochastic samplers; null = the sampler's default.")
    guidance_scale: float | None = field(None, "Classifier-free guidance scale; null = the model's default.")
    height: int | None = field(None, "Image height in pixels; null = the model's native resolution.")
    width: int | None = field(None, "Image width in pixels; null = the model's native resolution.")
    num_frames: int | None = field(None, "Frames per video (video models only); null = the model's default.")
    seed: int = field(0, "Random seed; the same seed, prompts and settings give the same samples.")
    num_images_per_prompt: int = field(1, "Samples drawn for each prompt.")
    out: str = field("out/samples", "Output directory for images/videos and the config used.")
    device: str | None = field(None, "Torch device (cuda, cuda:1, cpu); null = cuda if available, else cpu.")
    dtype: str = field("float32", "Weight dtype (the sampler maths always runs in fp32).", choices=DTYPES)
    guide: dict[str, float] = field({}, "Reward-gradient guidance: {reward name: weight}, e.g. "
                                        "guide='{shapes-clip: 1.0}'; empty = no guidance.")
    guide_scale: float = field(1.0, "Guidance strength (a positive scale raises the reward).")
    guide_mode: str = field("nrg", "nrg (Flow-NRG velocity correction) or euphonium (SDE drift shift).",
                            choices=("nrg", "euphonium"))
    guide_normalize: bool = field(True, "Normalise each sample's reward gradient to unit norm before scaling.")
    stream_chunks: int | None = field(None, "Video models: generate this many chunks causally with a rolling "
                                            "EMA-Sink KV cache (flowalign.sampling.streaming); null = one "
                                            "full-sequence sample of num_frames.")
    stream_chunk_frames: int = field(3, "Streaming: latent frames per chunk.")
    stream_window: int = field(6, "Streaming: latest cached latent frames kept (the rolling window).")
    stream_sinks: int = field(3, "Streaming: EMA-Sink slots (latent frames); 0 = a plain sliding window.")
    stream_sink_ema: float = field(0.999, "Streaming: EMA decay of the sink toward evicted frames (1 = a frozen "
                                          "attention sink of the first frames).")

    def __post_init__(self):
        check_choices(self)
        _require(self.stream_chunks is None or self.stream_chunks >= 1, "stream_chunks", self.stream_chunks,
                 "must be >= 1 or null (off)", "stream_chunks=8")
        _require(self.guide_scale >= 0, "guide_scale", self.guide_scale, "must be >= 0", "guide_scale=5")
        _require(self.num_steps is None or self.num_steps >= 1, "num_steps", self.num_steps, "must be >= 1",
                 "num_steps=20")
        _require(self.eta is None or self.eta >= 0, "eta", self.eta, "must be >= 0", "eta=0.7")
        _require(
            self.guidance_scale is None or self.guidance_scale >= 0,
            "guidance_scale",
            self.guidance_scale,
            "must be >= 0 (1 disables classifier-free guidance)",
            "guidance_scale=4.5",
        )
        for key in ("height", "width", "num_frames"):
            value = getattr(self, key)
            _require(value is None or value >= 1, key, value, "must be >= 1 or null (default)", f"{key}=null")
        _require(self.seed >= 0, "seed", self.seed, "must be >= 0", "seed=0")
        n = self.num_images_per_prompt
        _require(n >= 1, "num_images_per_prompt", n, "must be >= 1", "num_images_per_prompt=4")
        _require(bool(self.out), "out", self.out, "must be a non-empty path", "out=out/samples")


def _require(ok: bool, key: str, value: Any, rule: str, example: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {key} {rule}. Set it e.g. with `{example}`.")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_config(schema_cls: type, path_or_dict: Any = None, overrides: typing.Iterable[str] = ()) -> Any:
    """Build a ``schema_cls`` instance from its defaults, a YAML file (or dict) and dotted overrides.

    Later sources win: defaults < file < overrides (in order). Overrides are ``key=value`` with
    YAML values, e.g. ``num_steps=30``, ``optim.lr=1e-4``, ``prompts=[a,b]``, ``eta=null``.
    Returns a real dataclass instance (lists are Python lists) whose ``__post_init__`` has run.
    """
    if not (isinstance(schema_cls, type) and dataclasses.is_dataclass(schema_cls)):
        raise TypeError(f"schema_cls must be a dataclass type, got {schema_cls!r}.")
    sources = [_read_source(path_or_dict)] + [_parse_override(o) for o in overrides]
    try:
        data = OmegaConf.merge(*sources)
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(f"Could not merge the config sources: {_first_line(e)}") from e
    _check_keys(schema_cls, OmegaConf.to_container(data, resolve=False), prefix="")

    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema_cls), data)
        cfg = OmegaConf.to_object(typed)
    except oc_errors.MissingMandatoryValue as e:
        key = _full_key(e)
        raise ConfigError(f"Config key '{key}' has no value; set it, e.g. with `{key}=...`.") from e
    except oc_errors.InterpolationResolutionError as e:
        raise ConfigError(f"Config key '{_full_key(e)}': bad interpolation: {_first_line(e)}") from e
    except oc_errors.ValidationError as e:
        raise _type_error(schema_cls, data, e) from e
    except oc_errors.OmegaConfBaseException as e:
        raise ConfigError(f"Invalid config at '{_full_key(e)}': {_first_line(e)}") from e
    except ConfigError:
        raise
    except ValueError as e:  # a schema's __post_init__
        raise ConfigError(str(e)) from e
    _check_choices_recursive(cfg)
    return cfg


def _read_source(path_or_dict: Any) -> DictConfig:
    if path_or_dict is None:
        return OmegaConf.create({})
    if isinstance(path_or_dict, (str, os.PathLike)):
        path = Path(path_or_dict)
        if not path.is_file():
            raise FileNotFoundError(f"Config file not found: {str(path)!r} (resolved to {path.resolve()}).")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors come from PyYAML with their own line numbers
            raise ConfigError(f"Could not parse config file {str(path)!r}: {e}") from e
        if loaded is None or (isinstance(loaded, DictConfig) and not loaded):
            return OmegaConf.create({})
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"Config file {str(path)!r} must hold a mapping of keys at top level.")
        return loaded
    if dataclasses.is_dataclass(path_or_dict) and not isinstance(path_or_dict, type):
        return OmegaConf.create(dataclasses.asdict(path_or_dict))
    if isinstance(path_or_dict, (dict, DictConfig)):
        return OmegaConf.create(OmegaConf.to_container(OmegaConf.create(path_or_dict)))
    raise TypeError(
        f"path_or_dict must be None, a YAML path, a dict or a config, got {type(path_or_dict).__name__}."
    )


def _parse_override(override: str) -> DictConfig:
    form = "expected `key=value`, e.g. `num_steps=30`, `optim.lr=1e-4` or `prompts=[a cat,a dog]`"
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"Malformed override {override!r}: {form}.")
    key, value = override.split("=", 1)
    key = key.strip()
    if not _KEY_RE.match(key):
        hint = " (drop the leading dashes)" if key.startswith("-") else ""
        raise ConfigError(f"Malformed override {override!r}: bad key {key!r}{hint}; {form}.")
    try:
        return OmegaConf.from_dotlist([f"{key}={value}"])
    except Exception as e:
        raise ConfigError(
            f"Malformed override {override!r}: cannot parse the value {value!r} as YAML ({_first_line(e)}); "
            f"quote it for the shell, e.g. '{key}=[a cat,a dog]'."
        ) from e


def _check_keys(schema: Any, node: Any, prefix: str) -> None:
    """Walk user data against the schema; unknown keys and non-mappings for nested configs are errors."""
    where = f"'{prefix}'" if prefix else "the top level"
    if isinstance(node, str) and node.startswith("${"):
        return  # an interpolation; OmegaConf resolves and type-checks it later
    if not isinstance(node, dict):
        raise ConfigError(
            f"Config key '{prefix}' is a group of settings and expects a mapping with keys "
            f"{', '.join(_field_names(schema))}; got {node!r}. Set its keys with e.g. `{prefix}.KEY=VALUE`."
        )
    hints = typing.get_type_hints(schema)
    valid = _field_names(schema)
    for key in node.keys():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in valid:
            suggestion = _did_you_mean(str(key), valid, prefix)
            raise ConfigError(
                f"Unknown config key '{full}'.{suggestion} Valid keys at {where}: {', '.join(valid)}."
            )
        value = node[key]
        tp, optional = _unwrap_optional(hints[key])
        if value is None and optional:
            continue
        if _is_dataclass_type(tp):
            _check_keys(tp, value, full)
            continue
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (list, tuple) and args and _is_dataclass_type(args[0]) and isinstance(value, list):
            for i, item in enumerate(value):
                _check_keys(args[0], item, f"{full}[{i}]")
        elif origin is dict and len(args) == 2 and _is_dataclass_type(args[1]) and isinstance(value, dict):
            for k, item in value.items():
                _check_keys(args[1], item, f"{full}.{k}")


def _type_error(schema: type, data: DictConfig, e: Exception) -> ConfigError:
    key = _full_key(e)
    field_key = key.split("[", 1)[0]
    found = _find_field(schema, field_key)
    value = OmegaConf.select(data, field_key, default=None, throw_on_missing=False)
    if found is None:
        return ConfigError(f"Invalid value for config key '{key}': {_first_line(e)}")
    tp, default = found
    expected = _type_name(tp)
    example = f"{field_key}={_yaml_value(default)}" if default is not None else f"{field_key}=<{expected}>"
    return ConfigError(
        f"Config key '{field_key}' expects {expected}, got {_plain(value)!r} ({_first_line(e)}). "
        f"Fix it in the YAML file or override it, e.g. `{example}`."
    )


def _find_field(schema: type, dotted: str) -> tuple[Any, Any] | None:
    """(resolved type, default) of the value behind a dotted key, or None if the schema has no such key.

    A part after a ``dict[str, X]`` field is a dict key: its type is X and it has no default.
    """
    current, result = schema, None
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        if not _is_dataclass_type(current):
            return None
        fields = {f.name: f for f in dataclasses.fields(current)}
        if parts[i] not in fields:
            return None
        tp = typing.get_type_hints(current)[parts[i]]
        result = (tp, _field_default(fields[parts[i]]))
        inner, _ = _unwrap_optional(tp)
        if typing.get_origin(inner) is dict and i + 1 < len(parts):
            args = typing.get_args(inner)
            inner = args[1] if len(args) == 2 else Any
            result = (inner, None)
            i += 1
        current = inner
        i += 1
    return result


def _check_choices_recursive(cfg: Any, prefix: str = "") -> None:
    check_choices(cfg, prefix)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, list):
            items = {f"{f.name}[{i}]": v for i, v in enumerate(value)}
        elif isinstance(value, dict):
            items = {f"{f.name}.{k}": v for k, v in value.items()}
        else:
            items = {f.name: value}
        for key, item in items.items():
            if dataclasses.is_dataclass(item) and not isinstance(item, type):
                _check_choices_recursive(item, f"{prefix}{key}.")


# ----------------------------------------------------------------------------------------------
# Saving and describing
# ----------------------------------------------------------------------------------------------


def to_yaml(cfg: Any) -> str:
    """The config as YAML text; ``load_config(type(cfg), yaml_path)`` reads it back equal."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return OmegaConf.to_yaml(OmegaConf.structured(cfg))
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write ``to_yaml(cfg)`` to ``path`` (parents created), so a run folder records what it ran with.

    The file is written next to its target and renamed into place, so a crash never leaves half a config.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
    return path


def describe(schema_cls: type) -> str:
    """A help table of every (dotted) key of a schema: key, type, default and help text."""
    rows = [("KEY", "TYPE", "DEFAULT", "HELP")] + list(_describe_rows(schema_cls, ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    doc = (schema_cls.__doc__ or "").strip().splitlines()
    if doc and doc[0].startswith(schema_cls.__name__ + "("):
        doc = []  # the signature dataclasses writes when there is no docstring
    lines = [doc[0], ""] if doc else []
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return "\n".join(line.rstrip() for line in lines) + "\n"


def _describe_rows(schema: type, prefix: str) -> typing.Iterator[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        tp, _ = _unwrap_optional(hints[f.name])
        if _is_dataclass_type(tp):
            yield from _describe_rows(tp, key + ".")
            continue
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" [choices: {', '.join(map(str, f.metadata['choices']))}]"
        yield key, _type_name(hints[f.name]), _yaml_value(_field_default(f)), help_text


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_optional) for ``X | None`` / ``Optional[X]``; other types pass through."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if optional:
        return f"{_type_name(inner)} | None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin).replace("typing.", ""))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _yaml_value(value: Any) -> str:
    """A value as it would be typed on the command line: null, true, 1e-4, [a, b]."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple, dict)):
        plain = OmegaConf.to_container(OmegaConf.create({"v": value}))["v"]  # nested dataclasses too
        return yaml.safe_dump(plain, default_flow_style=True, width=10**6).strip()
    return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value)
    return value


def _did_you_mean(word: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close:
        return ""
    return f" Did you mean '{prefix + '.' if prefix else ''}{close[0]}'?"


def _full_key(e: Exception) -> str:
    return str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")


def _first_line(e: Exception) -> str:
    msg = getattr(e, "msg", None) or str(e)
    return str(msg).strip().splitlines()[0] if str(msg).strip() else type(e).__name__
