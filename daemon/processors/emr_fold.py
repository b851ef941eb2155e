"""One EMR input folded, piece by piece, into a mergeable partial (see emr_stats.py): which
columns are values, numbers parsed (unparsable ones counted), rows kept by the missing-value
rule. Memory is one piece plus the groups. Runs in worker processes."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from daemon.errors import ProcessorError
from daemon.models import Facts
from daemon.processors import emr_stats
from daemon.processors.options import (
    EmrOptions,
    identifier_key,
    is_code,
    is_person_identifier,
)
from daemon.processors.tables import is_numeric, is_publishable_header

# What pyarrow's string-to-double cast accepts, conservatively: anything else is unparsed.
_NUMBER = r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"
_MERGE_EVERY = 32


@dataclass(frozen=True, slots=True)
class Plan:
    """The roles of one input's columns."""

    group: str
    values: list[str]
    required: frozenset[str] | None  # None: each column over its own values
    withheld: int  # columns left out because their header looks like patient data


def plan_columns(options: EmrOptions, names: Sequence[str]) -> Plan:
    group = options.group_by
    required = None
    if options.missing == "row":
        required = frozenset(options.required_columns or names) | {group}
    if options.columns is not None:
        return Plan(group, [c for c in options.columns if c in names and c != group], required, 0)
    categories = {identifier_key(c) for c in options.category_columns}
    values, withheld = [], 0
    for name in names:
        if name == group or identifier_key(name) in categories or is_code(name):
            continue
        if is_person_identifier(name, options.id_columns):
            continue
        if not is_publishable_header(name):
            withheld += 1
            continue
        values.append(name)
    return Plan(group, values, required, withheld)


def to_number(column: pa.ChunkedArray | pa.Array, decimal: str) -> tuple[pa.Array, int, int]:
    """(float64 values with nulls, values parsed, values present but not numbers)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_null(kind):
        return pa.nulls(len(column), pa.float64()), 0, 0
    if is_numeric(kind):
        values = pc.cast(column, pa.float64())
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if decimal == ",":
            column = pc.replace_substring(column, ",", ".")
        try:
            values = pc.cast(column, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            parses = pc.match_substring_regex(column, _NUMBER)
            values = pc.cast(pc.if_else(parses, column, None), pa.float64())
    else:  # dates, booleans: not values to average
        present = len(column) - column.null_count
        return pa.nulls(len(column), pa.float64()), 0, present
    values = pc.if_else(pc.is_nan(values), None, values)
    parsed = len(values) - values.null_count
    return values, parsed, len(column) - column.null_count - parsed


def complete_rows(table: pa.Table, names: Iterable[str]) -> pa.Array | None:
    mask = None
    for name in names:
        column = table[name]
        valid = pc.is_valid(column)
        if pa.types.is_floating(column.type):
            valid = pc.and_(valid, pc.invert(pc.is_nan(column)))
        mask = valid if mask is None else pc.and_(mask, valid)
    return mask


@dataclass
class TableFold:
    """Pieces of one input in, one partial and its facts out."""

    options: EmrOptions
    path: Path
    plan: Plan | None = None
    rows: int = 0
    kept: int = 0
    parsed: Counter[str] = field(default_factory=Counter)
    unparsed: Counter[str] = field(default_factory=Counter)
    partials: list[pd.DataFrame] = field(default_factory=list)

    @property
    def keep_values(self) -> bool:
        return needs_values(self.options)

    def add(self, piece: pa.Table) -> None:
        plan = self.plan or self._start(piece.column_names)
        self.rows += piece.num_rows
        if self.rows > self.options.max_rows:
            limit = self.options.max_rows
            raise ProcessorError(self.path, "too_many_rows", f"more than max_rows ({limit})")
        if not piece.num_rows:
            return  # the header's piece: its columns are in the plan (a partial would cost a merge)
        mask = complete_rows(piece, plan.required or {plan.group})
        piece = piece.filter(mask)
        self.kept += piece.num_rows
        if self.keep_values and self.kept * len(plan.values) > self.options.max_quantile_values:
            limit = self.options.max_quantile_values
            raise ProcessorError(
                self.path, "too_many_values", f"median/quantiles over more than {limit} values"
            )
        columns: dict[str, pa.Array] = {plan.group: pc.cast(piece[plan.group], pa.string())}
        for name in plan.values:
            columns[name], parsed, unparsed = to_number(piece[name], self.options.decimal)
            self.parsed[name] += parsed
            self.unparsed[name] += unparsed
        table = pa.table(columns)
        self.partials.append(
            emr_stats.reduce(table, plan.group, plan.values, self.keep_values, None)
        )
        if len(self.partials) >= _MERGE_EVERY:
            self.partials = [emr_stats.merge(self.partials, self.keep_values)]

    def _start(self, names: list[str]) -> Plan:
        if self.options.group_by not in names:
            group = self.options.group_by
            raise ProcessorError(self.path, "missing_group_column", f"no column named {group!r}")
        self.plan = plan_columns(self.options, names)
        if self.plan.required is not None:
            missing = self.plan.required - set(names)
            if missing:
                raise ProcessorError(
                    self.path, "missing_column", f"{len(missing)} required column(s)"
                )
        return self.plan

    def finish(self) -> tuple[pd.DataFrame, Facts]:
        if self.plan is None:
            raise ProcessorError(self.path, "empty", "no rows and no header")
        partial = emr_stats.merge(self.partials, self.keep_values)
        if not len(partial.columns):
            partial = emr_stats.empty(self.keep_values, self.plan.values)
        # A column mostly not numbers is text here: dropped, and named in the facts.
        text = [c for c in self.plan.values if self.unparsed[c] > self.parsed[c]]
        partial = partial.drop(columns=[c for c in partial.columns if c.split(":", 1)[-1] in text])
        unparsed = {c: n for c, n in self.unparsed.items() if n and c not in text}
        facts = file_facts(self.options, self.rows, self.kept, len(partial), self.plan.withheld)
        if text:
            facts["non_numeric"] = ";".join(text)
        # Rounded up, as rows are rounded down: never 0 when there were some, never exact.
        step = self.options.min_cell_size
        facts.update({f"unparsed:{c}": -(-n // step) * step for c, n in unparsed.items()})
        return partial, facts


def needs_values(options: EmrOptions) -> bool:
    return any(s == "median" or re.match(r"p\d", s) for s in options.statistics)


def file_facts(options: EmrOptions, rows: int, kept: int, groups: int, withheld: int) -> Facts:
    """Per-input counts. With suppression on they are rounded down to a multiple of
    min_cell_size: exact counts per file could reopen a suppressed cell by subtraction."""
    step = options.min_cell_size
    facts: Facts = {
        "rows": rows - rows % step,
        "rows_dropped": (rows - kept) - (rows - kept) % step,
        "groups": groups,
    }
    if step > 1:
        facts["rounded_to"] = step
    if withheld:
        facts["withheld_columns"] = withheld
    return facts
