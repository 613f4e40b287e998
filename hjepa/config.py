"""Config validation and object building.

Every group node in ``conf/`` either names a ``_target_`` (a plain constructor in this
package) or is a plain settings node with a dataclass schema registered in ``SCHEMAS``.
``validate`` checks the whole composed config against those signatures before any work
starts: unknown keys and values of the wrong type are errors that name the key, the
expected type and the target. The constructor signatures are the single source of truth,
so there is no second schema to keep in sync.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hjepa.errors import ConfigError, HJEPAError

HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


@dataclass
class MixtureComponent:
    weight: float
    dataset: dict


@dataclass
class MixtureConfig:
    """``mixture:``: named components, each a weight and a dataset config."""

    components: dict[str, MixtureComponent]
    strategy: Literal["weighted", "balanced", "concat"] = "weighted"
    epoch_length: Optional[int] = None


@dataclass
class RootConfig:
    """The top level of ``conf/config.yaml``. Group nodes are checked by their targets."""

    seed: int
    image_size: int
    patch_size: int
    data_root: str
    dataset: Optional[dict]
    mixture: Optional[MixtureConfig]
    transform: dict
    mask: dict
    model: dict
    optim: dict
    trainer: dict
    hardware: dict
    logger: dict
    monitor: dict


def validate(cfg: DictConfig) -> DictConfig:
    """Resolve interpolations and check keys and types everywhere; return the resolved config."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config cannot be resolved: {e}") from None
    check_against(plain, RootConfig, "")
    check_targets(plain, "")
    resolved = OmegaConf.create(plain)
    OmegaConf.set_struct(resolved, True)
    return resolved


def dataset_configs(cfg: DictConfig, name: Optional[str] = None) -> dict[str, DictConfig]:
    """The named dataset configs of a config: a mixture's components by their names, or the
    single `dataset` under `name` (its config option, e.g. "imagenet100"), else under the
    name of its class (and subset)."""
    if cfg.get("mixture") is not None:
        return {n: c.dataset for n, c in cfg.mixture.components.items()}
    if cfg.get("dataset") is None:
        raise ConfigError("no training data: set dataset=<name> or mixture=<name>")
    if name is None:
        name = str(cfg.dataset["_target_"]).rsplit(".", 1)[-1]
        subset = cfg.dataset.get("subset")
        name = f"{name}[{Path(str(subset)).stem}]" if subset else name
    return {name: cfg.dataset}


def build(node: DictConfig | dict, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that surfaces our own errors and bad arguments cleanly."""
    target = node.get("_target_", "?")
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, HJEPAError):
            raise cause from None
        if isinstance(cause, (TypeError, ValueError)):
            raise ConfigError(f"cannot build {target}: {cause}") from None
        raise


def check_targets(node: Any, path: str) -> None:
    if isinstance(node, dict):
        if "_target_" in node:
            check_against(node, _locate(node["_target_"], path), path)
        for key, value in node.items():
            check_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_targets(value, f"{path}[{i}]")


def _locate(name: str, path: str) -> Any:
    try:
        return hydra.utils.get_object(name)
    except Exception as e:  # ImportError, AttributeError, hydra's own wrappers
        raise ConfigError(f"{path}._target_: cannot import '{name}' ({e})") from None


def check_against(node: Any, target: Any, path: str) -> None:
    """Check a dict's keys and value types against a callable's signature or a dataclass."""
    where = path or "<top level>"
    name = getattr(target, "__qualname__", str(target))
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: expected a mapping of arguments for {name}, got {node!r}")
    params, hints = _parameters(target)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        key_path = f"{path}.{key}" if path else str(key)
        if key not in params:
            if accepts_any:
                continue
            known = ", ".join(k for k, p in params.items() if p.kind is not p.VAR_POSITIONAL)
            raise ConfigError(f"{key_path}: unknown key for {name}. Valid keys: {known}")
        _check_type(value, hints.get(key, Any), key_path)
    if dataclasses.is_dataclass(target):  # settings nodes: nothing is injected later
        for f in dataclasses.fields(target):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required and f.name not in node:
                raise ConfigError(f"{path + '.' if path else ''}{f.name}: missing (required by {name})")


def _parameters(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    if dataclasses.is_dataclass(target):
        fn = target
    else:
        fn = target.__init__ if inspect.isclass(target) else target
    sig = inspect.signature(fn)
    params = {k: p for k, p in sig.parameters.items() if k != "self"}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: skip type checks, keep key checks
        hints = {}
    return params, hints


def _check_type(value: Any, tp: Any, path: str) -> None:
    if not _matches(value, tp, path):
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _matches(value: Any, tp: Any, path: str) -> bool:
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a, path) for a in args)
    if origin is Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            return False
        check_against(value, tp, path)  # raises with the precise key on mismatch
        return True
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(
                _matches(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args))
            )
        item = args[0] if args else Any
        return all(_matches(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        if not isinstance(value, dict):
            return False
        item = args[1] if len(args) == 2 else Any
        return all(_matches(v, item, f"{path}.{k}") for k, v in value.items())
    # Objects injected at build time (datasets, transforms, modules): nothing to check here.
    return True


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))

