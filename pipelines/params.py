"""params.yaml (composed by DVC/Hydra from conf/): load, compose with overrides, validate against a typed schema.

The schema is a tree of dataclasses mirroring params.yaml; the stage settings in it are dpa_core's own
(dpa_core/settings.py: their defaults and range checks live there, once). pydantic builds the tree from
the YAML and checks keys and types; its errors are turned into one ParamsError that names the key path,
the nearest valid key for a typo, and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import TypeAdapter, ValidationError
from pydantic_core import SchemaValidator

from dpa_core.errors import DPAInputError, SettingError
from dpa_core.settings import (FORBID_UNKNOWN_KEYS, BenchmarkSettings, CaptionSet, DataSource,
                               LoraSettings, LossConfig, MixSource, ModelPaths, TrainSettings, require_positive)

CONF_DIR = Path("conf")  # Hydra config dir (DVC's default): config.yaml + profile/<name>.yaml


class ParamsError(DPAInputError):
    pass


# ---- schema -----------------------------------------------------------------------------------
# Sections that only the pipeline has. Their fields have no defaults: conf/config.yaml sets every one
# (a default here would be a second one, and would differ from the stage functions'); dpa_core's
# settings inside them keep theirs. Value checks raise SettingError from __post_init__ (pydantic runs
# it and reports where the section sits).

def _outside(path, root: Path) -> bool:
    return not Path(path).resolve().is_relative_to(root)


@dataclass
class World:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    size: Literal["smoke", "default"]
    seed: int
    out: str
    base_models: Optional[str]
    verbose_style: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.verbose_style <= 1.0:
            raise SettingError("verbose_style", f"must lie in 0..1 (got {self.verbose_style}).",
                               fix="use 1 for the full florid register, 0 for plain sentences.")


@dataclass
class Data:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    root: str
    captions: list[MixSource]
    instructions: list[DataSource]

    def __post_init__(self) -> None:
        root = Path(self.root).resolve()
        for what in ("captions", "instructions"):
            sources = getattr(self, what)
            if not sources:
                raise SettingError(what, "is empty.", fix="list at least one source.")
            names = [s.name for s in sources]
            if len(set(names)) != len(names):
                raise SettingError(what, f"has duplicate names {names}.", fix="give each source a unique name.")
            for i, s in enumerate(sources):
                for attr in ("path", "image_root"):
                    value = getattr(s, attr)
                    if value is not None and _outside(value, root):
                        raise SettingError(f"{what}[{i}].{attr}", f"= {str(value)!r} is outside data.root "
                                           f"({self.root}); DVC would not see changes to it.",
                                           fix="move or symlink the data under data.root, or set data.root to a "
                                           "common parent.")


@dataclass
class Mix:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    seed: int
    total: Optional[int]
    dedup: bool

    def __post_init__(self) -> None:
        if self.total is not None:
            require_positive(self.total, "total")


@dataclass
class Arm:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    proxy: bool
    loss: Literal["vanilla", "cmo", "cal"]
    # false: no alignment; the finetune starts from the connector the aligned arms start from,
    # untrained (the control that tells whether alignment pays at all in the study).
    align: bool = True

    def __post_init__(self) -> None:
        if self.proxy and not self.align:
            raise SettingError("proxy", "is true but align is false: the proxy LLM is used only to align against.",
                               fix="set proxy: false for an arm without alignment.")


@dataclass
class Study:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    proxy_arms: list[str]
    plain_arms: list[str]
    seeds: list[int]

    def __post_init__(self) -> None:
        if not self.seeds:
            raise SettingError("seeds", "is empty.", fix="list at least one seed, e.g. [0].")
        if len(set(self.seeds)) != len(self.seeds):
            raise SettingError("seeds", f"has duplicates {self.seeds}.", fix="list each once.")
        if not (self.proxy_arms or self.plain_arms):
            raise SettingError(None, "no arm to run.", fix="list arms in proxy_arms/plain_arms.")

    @property
    def arms(self) -> list[str]:
        return [*self.proxy_arms, *self.plain_arms]


@dataclass(frozen=True)
class Loss(LossConfig):
    """LossConfig (the arm chooses its `kind`) and in which stages CMO/CAL applies."""

    cmo_in_align: bool = True
    cmo_in_finetune: bool = True

    def for_stage(self, kind: str, stage: str) -> LossConfig:
        """The loss `stage` trains with for an arm whose loss is `kind`."""
        if kind != "vanilla" and not (self.cmo_in_align if stage == "align" else self.cmo_in_finetune):
            kind = "vanilla"
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(LossConfig)}
        return LossConfig(**{**shared, "kind": kind})


@dataclass
class Proxy:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    lora: LoraSettings
    max_length: int
    sequence_end: Literal["eos", "newline"]
    train: TrainSettings

    def __post_init__(self) -> None:
        if self.train.group_by_modality_length:
            raise SettingError("train.group_by_modality_length", "is not for the proxy stage: it trains on text "
                               "only, there is no modality to group by.", fix="set it to false.")


@dataclass
class Align:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    max_length: int
    image_aspect_ratio: Literal["crop", "pad"]
    sequence_end: Literal["eos", "newline"]
    train: TrainSettings


@dataclass
class Finetune:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    tune: Literal["lora", "full"]
    lora: LoraSettings
    max_length: int
    image_aspect_ratio: Literal["crop", "pad"]
    image_first: bool
    system_prompt: Optional[str]
    connector_learning_rate: Optional[float]
    train: TrainSettings

    def __post_init__(self) -> None:
        if self.connector_learning_rate is not None:
            require_positive(self.connector_learning_rate, "connector_learning_rate")


@dataclass
class Evaluate:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    benchmarks: list[BenchmarkSettings]
    batch_size: int
    max_new_tokens: int
    limit: Optional[int]
    reference_row: bool
    lmu_data: Optional[str]


@dataclass
class Reliance:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    captions: list[CaptionSet]  # held-out caption sets (LLaVA format)
    content_words: Optional[str]  # JSON list of content words, or {class: [words]}; None: the all-token mean only
    limit: Optional[int]
    batch_size: int
    max_length: int

    def __post_init__(self) -> None:
        require_positive(self.batch_size, "batch_size")
        require_positive(self.max_length, "max_length")
        if self.limit is not None:
            require_positive(self.limit, "limit")
        names = [c.name for c in self.captions]
        if len(set(names)) != len(names):
            raise SettingError("captions", f"has duplicate names {names}.",
                               fix="give each caption set a unique name (it names its metrics).")


@dataclass
class Tracking:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    experiment: str
    uri: str
    log_checkpoints: bool


@dataclass
class Runtime:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    outputs: str
    executor: Literal["local", "docker"]
    image: str
    gpus: Optional[str]
    launcher: Literal["python", "accelerate"]
    accelerate_config: str
    num_processes: int


@dataclass
class Params:
    __pydantic_config__ = FORBID_UNKNOWN_KEYS

    profile: str
    world: World
    model: ModelPaths
    data: Data
    mix: Mix
    arms: dict[str, Arm]
    study: Study
    loss: Loss
    proxy: Proxy
    align: Align
    finetune: Finetune
    evaluate: Evaluate
    reliance: Reliance
    tracking: Tracking
    runtime: Runtime

    def check(self) -> None:
        """What spans sections (after pydantic built and checked each one)."""
        for group, want in (("proxy_arms", True), ("plain_arms", False)):
            for name in getattr(self.study, group):
                if name not in self.arms:
                    raise ParamsError(f"study.{group} names an unknown arm {name!r}.{_nearest(name, self.arms)}",
                                      file="params.yaml", fix="define it under `arms:` or fix the name.")
                if self.arms[name].proxy != want:
                    other = "plain_arms" if want else "proxy_arms"
                    raise ParamsError(f"arm {name!r} has proxy: {self.arms[name].proxy}, so it belongs in "
                                      f"study.{other}, not study.{group}.", file="params.yaml",
                                      fix=f"move {name!r} to study.{other}.")
        root = Path(self.data.root).resolve()
        for i, c in enumerate(self.reliance.captions):
            for attr in ("path", "image_root"):
                if _outside(getattr(c, attr), root):
                    raise ParamsError(f"reliance.captions[{i}].{attr} = {str(getattr(c, attr))!r} is outside data.root "
                                      f"({self.data.root}); DVC would not see changes to it.", file="params.yaml",
                                      fix="move or symlink the held-out captions under data.root.")
        if self.reliance.content_words and not Path(self.reliance.content_words).resolve().is_relative_to(root):
            raise ParamsError(f"reliance.content_words = {self.reliance.content_words!r} is outside data.root "
                              f"({self.data.root}).", file="params.yaml", fix="move the word list under data.root.")
        local = [(f"evaluate.benchmarks[{i}].path", b.path) for i, b in enumerate(self.evaluate.benchmarks) if b.path]
        if any(b.kind == "vlmeval" for b in self.evaluate.benchmarks) and self.evaluate.lmu_data:
            local.append(("evaluate.lmu_data", self.evaluate.lmu_data))
        for key, value in local:  # the evaluate stages depend on data.root: what they read must lie there
            if not Path(value).resolve().is_relative_to(root):
                raise ParamsError(f"{key} = {value!r} is outside data.root ({self.data.root}); DVC would not see "
                                  "changes to it.", file="params.yaml",
                                  fix="move or symlink the benchmark data under data.root (e.g. data/LMUData).")
        for stage in ("proxy", "align", "finetune"):  # dpa_core checks it per run, with the number of processes
            t = getattr(self, stage).train
            if t.global_batch_size % t.per_device_batch_size:
                raise ParamsError(f"{stage}.train.global_batch_size ({t.global_batch_size}) is not a multiple of "
                                  f"per_device_batch_size ({t.per_device_batch_size}).", file="params.yaml",
                                  fix="gradient accumulation is derived as global / (per_device x processes).")
        if self.runtime.num_processes > 1 and self.runtime.launcher != "accelerate":
            raise ParamsError("runtime.num_processes > 1 needs runtime.launcher: accelerate.", file="params.yaml",
                              fix="set launcher: accelerate, or num_processes: 1.")

    # -- views used by the stages ---------------------------------------------------------------
    def arm(self, name: str) -> Arm:
        if name not in self.arms:
            raise ParamsError(f"unknown arm {name!r}.{_nearest(name, self.arms)}", file="params.yaml",
                              fix="use an arm defined under `arms:`.")
        return self.arms[name]

    def to_dict(self) -> dict:
        return _adapter(Params).dump_python(self, mode="json")

    def train_settings(self, stage: str, seed: int) -> TrainSettings:
        """The training settings `stage` (proxy | align | finetune) runs with for study seed `seed`."""
        section = getattr(self, stage)
        extra = {"connector_learning_rate": section.connector_learning_rate} if stage == "finetune" else {}
        return dataclasses.replace(section.train, seed=seed, **extra)

    def loss_config(self, arm: str, stage: str) -> LossConfig:
        return self.loss.for_stage(self.arm(arm).loss, stage)


# ---- validation ---------------------------------------------------------------------------------

# Fields of dpa_core's settings that each run sets, not params.yaml: (key path) -> where the value comes from
SET_PER_RUN = {**{(stage, "train", "seed"): "study.seeds" for stage in ("proxy", "align", "finetune")},
               **{(stage, "train", "connector_learning_rate"): "finetune.connector_learning_rate"
                  for stage in ("proxy", "align", "finetune")},
               ("loss", "kind"): "each arm's `loss` (arms.<name>.loss)"}

TYPE_ERRORS = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "list", "dict": "mapping",
               "dataclass": "mapping", "path": "str"}


@cache
def _adapter(cls) -> TypeAdapter:
    return TypeAdapter(cls)


def _strict_scalars(schema):
    """`schema` (a pydantic core schema) with int, bool and str validated strictly: in pydantic's lax
    mode `r: true` would read as 1, `r: "64"` as 64 and `dedup: "yes"` as true. Floats stay lax, so a
    quoted "3e-4" (in YAML, or typed in a Prefect text field) reads as 3e-4."""
    if isinstance(schema, dict):
        if schema.get("type") in ("int", "bool", "str"):
            schema["strict"] = True
        for value in schema.values():
            _strict_scalars(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict_scalars(value)
    return schema


@cache
def _validator(cls) -> SchemaValidator:
    return SchemaValidator(_strict_scalars(copy.deepcopy(_adapter(cls).core_schema)))


def _nearest(name: str, options) -> str:
    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(name), options, n=1, cutoff=0.5)
    # an abbreviation or an extension of a valid key ("rank" for "r", "lr" for "learning_rate") too
    close = close or [o for o in options if o.startswith(str(name)) or str(name).startswith(o)][:1]
    return f" Did you mean {close[0]!r}?" if close else ""


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _type_at(cls, loc):
    """The schema type at `loc` (a pydantic error location) below dataclass `cls`."""
    tp = cls
    for part in loc:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Union:  # Optional[X]
            tp = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is list:
            tp = args[0]
        elif origin is dict:
            tp = args[1]
        elif dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp)[part]
    return tp


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _params_error(cls, err: dict) -> ParamsError:
    """pydantic's first error as a ParamsError naming the key path, with the fix."""
    loc, kind, value = err["loc"], err["type"], err.get("input")
    key = _dotted(loc)
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, SettingError):  # a range check of the section at `loc`
        where = ".".join(k for k in (key, cause.key) if k)
        problem = f"{where} {cause.detail}" if cause.key else f"{key or 'params'}: {cause.detail}"
        return ParamsError(problem, file="params.yaml", fix=cause.fix)
    if kind == "unexpected_keyword_argument":
        names = [f.name for f in dataclasses.fields(_type_at(cls, loc[:-1]))]
        return ParamsError(f"unknown key {key!r}.{_nearest(loc[-1], names)}", file="params.yaml",
                           fix=f"valid keys here: {', '.join(names)}.")
    if kind in ("missing", "missing_argument") and key == "profile":
        return ParamsError("profile is missing.", file="params.yaml",
                           fix="each conf/profile/<name>.yaml sets `profile: <name>` (its MLflow tag, and what "
                           "`dpa validate` composes to compare).")
    if kind in ("missing", "missing_argument"):
        return ParamsError(f"{key} is missing.", file="params.yaml",
                           fix=f"set {key} (conf/config.yaml sets every key).")
    if kind == "literal_error":
        allowed = list(typing.get_args(_type_at(cls, loc)))
        return ParamsError(f"{key} = {value!r} is not one of {allowed}.{_nearest(value, allowed)}",
                           file="params.yaml", fix=f"use one of {allowed}.")
    want = TYPE_ERRORS.get(kind.split("_")[0])
    if want == "bool":
        return ParamsError(f"{key} must be true or false (got {value!r}).", file="params.yaml", fix="use true/false.")
    if want in ("list", "mapping"):
        return ParamsError(f"{key or 'params'} must be a {want} (got {type(value).__name__}).", file="params.yaml",
                           fix=f"write {key or 'params'} as a YAML {want} (check the indentation).")
    if want:
        return ParamsError(f"{key} must be of type {want} (got {_short(value)}).", file="params.yaml",
                           fix=f"set {key} to a {want}.")
    return ParamsError(f"{key or 'params'}: {err['msg']} (got {_short(value)}).", file="params.yaml",
                       fix="see conf/config.yaml for the expected form.")


def _refuse_set_per_run(data: dict) -> None:
    for keys, source in SET_PER_RUN.items():
        node = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and keys[-1] in node:
            key = ".".join(keys)
            raise ParamsError(f"{key} is not a setting of params.yaml: each run takes it from {source}.",
                              file="params.yaml", fix=f"remove {key}; set {source} instead.")


def build(cls, data: Any):
    """An instance of the schema dataclass `cls` from YAML data: keys, types and values checked by
    pydantic (and dpa_core's settings), then what spans sections (`check`)."""
    if data is None:
        data = {}
    if cls is Params and isinstance(data, dict):
        _refuse_set_per_run(data)
    try:
        obj = _validator(cls).validate_python(data)
    except ValidationError as e:
        errors = e.errors()  # an unknown key first: a misspelt key is also a missing one
        first = next((err for err in errors if err["type"] == "unexpected_keyword_argument"), errors[0])
        raise _params_error(cls, first) from None
    if hasattr(obj, "check"):
        obj.check()
    return obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {'dotted.key': leaf}; an empty mapping is a leaf."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# ---- loading ------------------------------------------------------------------------------------

# YAML 1.2's float: `2e-5`, `1e-3` and `5E-4` are floats (PyYAML follows YAML 1.1, where an exponent
# needs a dot and a sign, so it read them as strings; DVC and ruamel read them as floats).
FLOAT_12 = re.compile(r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X)


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats and duplicate keys refused (DVC refuses them too)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first is not None:
                raise ParamsError(
                    f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line {first}).",
                    file=key_node.start_mark.name, fix="keep one of the two; YAML would silently use the last.")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


ParamsLoader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_12, list("-+0123456789."))


def load_yaml(text: str, name: str = "<string>"):
    """YAML as params files are read everywhere here (params.yaml, profiles, -S values)."""
    loader = ParamsLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()

def set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' with a YAML-typed value (as `dvc exp run -S`)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} is not key=value.", fix="write e.g. proxy.lora.r=64.")
    k, v = text.split("=", 1)
    try:
        return k.strip(), load_yaml(v, f"override {text!r}")
    except yaml.YAMLError as e:
        raise ParamsError(f"override {text!r}: the value is not valid YAML ({e}).",
                          fix="quote strings, write lists as [a, b].") from None


def compose(conf_dir: str | Path = CONF_DIR, overrides: dict[str, Any] | None = None) -> dict:
    """The effective settings as `dvc exp run -S k=v ...` writes them into params.yaml: Hydra composes
    conf/config.yaml with the selected profile (conf/profile/<name>.yaml, `profile` override or the
    default of config.yaml), then every other override is set over both."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / "config.yaml").is_file():
        raise ParamsError("no conf/config.yaml: the settings are composed from it.", file=conf_dir / "config.yaml",
                          fix="run from the project root (or pass the params.yaml that lies beside conf/).")
    rest = dict(overrides or {})
    groups = []
    if "profile" in rest:
        profile = rest.pop("profile")
        known = sorted(p.stem for p in (conf_dir / "profile").glob("*.yaml"))
        if profile not in known:
            raise ParamsError(f"unknown profile {profile!r}.{_nearest(profile, known)}",
                              file=conf_dir / "profile", fix=f"use one of {known}.")
        groups.append(f"profile={profile}")
    try:
        with initialize_config_dir(str(conf_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=groups)
    except HydraException as e:
        raise ParamsError(f"cannot compose the settings: {e}", file=conf_dir,
                          fix="fix the YAML of conf/config.yaml or the profile it names.") from None
    data = OmegaConf.to_container(cfg, resolve=True)
    for k, v in rest.items():
        set_dotted(data, k, v)
    return data


def write_params(path: str | Path, data: dict) -> None:
    """params.yaml as DVC's Hydra composition writes it (OmegaConf's YAML), replaced atomically."""
    from omegaconf import OmegaConf

    path = Path(path)
    text = OmegaConf.to_yaml(OmegaConf.create(data))
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return  # unchanged: leave the file (and its mtime) alone
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """The settings the stages run with, validated.

    Without overrides: params.yaml as it is (what DVC interpolates and tracks, what `dvc repro` runs).
    With overrides: what `dvc exp run -S k=v ...` would write there, i.e. conf/ (beside params.yaml)
    composed with the profile and the overrides (`compose`). There is no second merge: the values
    DVC records are the values the stages use.
    """
    path = Path(path)
    if overrides:
        return build(Params, compose(path.parent / CONF_DIR, overrides))
    try:
        raw = load_yaml(path.read_text(), str(path)) or {}
    except FileNotFoundError:
        raise ParamsError("params file not found.", file=path,
                          fix="run from the project root, or write it from conf/ with `dpa compose`.") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"not valid YAML: {e}", file=path, fix="fix the YAML syntax.") from None
    return build(Params, raw)


def drift_from_conf(path: str | Path, profile: str) -> list[str]:
    """The keys where params.yaml differs from conf/ composed with `profile` ([] when none, or no conf/)."""
    path = Path(path)
    if not (path.parent / CONF_DIR / "config.yaml").is_file():
        return []
    have = flatten(build(Params, load_yaml(path.read_text(), str(path))).to_dict())
    want = flatten(build(Params, compose(path.parent / CONF_DIR, {"profile": profile})).to_dict())
    return sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
