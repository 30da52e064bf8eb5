"""Command-line options generated from a parameter model's fields (training/config.py).

Why: the run's parameters are declared once, as pydantic fields; ``tml train`` and
``tml retrain`` take their options from them -- flag, type, constraints, default and help -- so a
new parameter reaches the command line with no edit here. The rules:

- the flag is the field name with dashes (``steps_per_epoch`` -> ``--steps-per-epoch``);
- a bool is a switch (``--incremental``);
- a list (tuple) of strings is repeatable, one item per flag, named for one item
  (``wait_for_evaluators`` -> ``--wait-for-evaluator PARTITION``, the plural works too);
- a dict is one JSON object (``--storage-options '{"endpoint_url": "..."}'``);
- anything else is checked against the field's type and constraints as it is parsed, so bad
  input is argparse's exit 2, before anything starts;
- options are grouped by the field's group (:data:`training.config.GROUP_TITLES`), if any;
- what only the whole model can check (a validator across fields) fails when the command
  builds the model (:func:`build_model`): :class:`InvalidParametersError`, one line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from tml_checkpointing.errors import CheckpointError
from training.config import GROUP_TITLES, Group, field_group

Model = TypeVar("Model", bound=BaseModel)


class InvalidParametersError(CheckpointError, ValueError):
    """Options that pass each one's own check but not the model's (a validator across fields,
    such as ``--initial-checkpoint`` inside ``--save-dir``); the message is one line."""


# Extra checks made while parsing, beyond the field's type (a recipe that does not import).
Check = Callable[[Any], None]


def _unwrap_optional(annotation: Any) -> Any:
    """``int | None`` -> ``int`` (None is what an option left out means)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def kind(field: FieldInfo) -> str:
    """How a field is given on the command line: ``switch``, ``repeated``, ``json`` or ``value``."""
    annotation = _unwrap_optional(field.annotation)
    origin = typing.get_origin(annotation) or annotation
    if annotation is bool:
        return "switch"
    if origin in (list, tuple):
        return "repeated"
    if origin is dict:
        return "json"
    return "value"


def option_names(name: str, field: FieldInfo) -> list[str]:
    """The flags of field ``name``: the first is the one shown in help and docs."""
    flag = "--" + name.replace("_", "-")
    if kind(field) == "repeated" and flag.endswith("s"):
        return [flag[:-1], flag]  # one item per flag: --wait-for-evaluator validation
    return [flag]


def shown_default(field: FieldInfo) -> str:
    """The default as a person reads it (``None`` and empty: none; a required field: required)."""
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if default is None or default == () or default == []:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    return str(default)


def _parser_of(name: str, field: FieldInfo, check: Check | None) -> Callable[[str], Any]:
    """Text -> value, validated like the model validates the field (argparse's ``type``)."""
    annotation = _unwrap_optional(field.annotation)  # a given option is never None
    if kind(field) == "repeated":
        annotation = typing.get_args(annotation)[0]
    elif field.metadata:  # constraints (ge, gt, min_length...) apply to the value, not items
        annotation = typing.Annotated.__class_getitem__((annotation, *field.metadata))  # type: ignore[attr-defined]
    adapter: TypeAdapter[Any] = TypeAdapter(annotation)

    def parse(text: str) -> Any:
        try:
            value = json.loads(text) if kind(field) == "json" else text
            value = adapter.validate_python(value)
        except (ValidationError, ValueError, RecursionError) as error:  # JSON nested too deep
            reason = error.errors()[0]["msg"] if isinstance(error, ValidationError) else error
            raise argparse.ArgumentTypeError(f"{text!r}: {reason}") from None
        if check is not None:
            check(value)
        return value

    parse.__name__ = name  # argparse names the type in its "invalid ... value" message
    return parse


def ordered_fields(*models: type[BaseModel]) -> list[tuple[type[BaseModel], str, FieldInfo]]:
    """The fields of ``models`` as shown (help, docs): by group, required ones first, then in
    declaration order."""
    order: list[Group | None] = [None, *GROUP_TITLES]  # a field without a group: first
    fields = [
        (model, name, field) for model in models for name, field in model.model_fields.items()
    ]
    return sorted(
        fields,
        key=lambda item: (order.index(field_group(item[0], item[1])), not item[2].is_required()),
    )


def add_model_options(
    parser: argparse.ArgumentParser,
    *models: type[BaseModel],
    exclude: Iterable[str] = (),
    checks: Mapping[str, Check] | None = None,
) -> None:
    """Add one option per field of ``models`` (less ``exclude``) to ``parser``, in argument
    groups by field group."""
    groups: dict[Group, argparse._ArgumentGroup] = {}
    skipped = set(exclude)
    for model, name, field in ordered_fields(*models):
        if name in skipped:
            continue
        where = field_group(model, name)
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if where is not None:
            if where not in groups:
                groups[where] = parser.add_argument_group(GROUP_TITLES[where])
            target = groups[where]
        flags = option_names(name, field)
        help_text = (field.description or "").replace("%", "%%")
        how = kind(field)
        if how == "switch":
            if field.get_default() is not False:
                raise TypeError(f"{model.__name__}.{name}: a switch must default to False")
            target.add_argument(*flags, dest=name, action="store_true", help=help_text)
            continue
        required = field.is_required()
        default_text = "" if required else f" (default: {shown_default(field)})"
        target.add_argument(
            *flags,
            dest=name,
            type=_parser_of(name, field, (checks or {}).get(name)),
            action="append" if how == "repeated" else "store",
            required=required,
            default=None,  # left out: the model's default applies (see model_arguments)
            metavar=name.upper() if how != "repeated" else name.upper().rstrip("S"),
            help=help_text + default_text,
        )


def model_arguments(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The options given for ``model``'s fields (left out ones are absent: model defaults)."""
    given: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        value = getattr(args, name, None)
        if kind(field) == "switch":
            if value:
                given[name] = True
        elif value is not None:
            given[name] = value
    return given


def one_line(error: ValidationError) -> str:
    """A pydantic error as one line: ``field: reason; ...`` (no input dump, no URL)."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        reason = str(item["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {reason}" if where else reason)
    return "; ".join(parts)


def build_model(args: argparse.Namespace, model: type[Model]) -> Model:
    """``model`` from the options given (:func:`model_arguments`); its validators' refusals
    become :class:`InvalidParametersError` (one line) instead of pydantic's multi-line dump."""
    try:
        return model(**model_arguments(args, model))
    except ValidationError as error:
        raise InvalidParametersError(f"invalid parameters: {one_line(error)}") from None
