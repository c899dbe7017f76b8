"""The one rule every MIMIC table and value goes through: refuse, or repair and count.

Both loaders (`ckd_ehr.data.mimic` for MIMIC-III, `ckd_ehr.data.mimic4` for MIMIC-IV) read
their tables through the helpers here, so a rule is written once:

- refuse (`MimicError`): the message names the file, the column, how many rows and an
  example value. A table that cannot be read or decompressed, two files for one table, a
  missing table or column, an empty table, a column with more than `data.max_bad_fraction`
  of its values unparseable (dates parse with one stated format per column,
  `data.date_formats`), codes that lost their leading zeros;
- repair and count (`TableReport.drop` / `TableReport.repair`): exact duplicate rows,
  null-like values (`NaN`, `NULL`, `NA`, `None`, `N/A`, any case, or empty) where a value is
  needed, the few unparseable values under the threshold, events of unknown admissions,
  admissions discharged before they were admitted, ids written as decimals ('123.0'),
  impossible ages. Every repair lands in `data/prepare_report.json` (`repairs`) and in the
  closing lines of `ckd-ehr prepare`; `data.strict` turns every repair into an error;
- count without changing anything (`TableReport.note`): what the release does on purpose
  (ages over 89 capped at 90) or what is odd but usable (overlapping admissions of a patient).

Empty values are nulls, never unparseable values: a missing dischtime is not a bad date.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ckd_ehr.config.data import DATE_COLUMNS, RELEASE_DATE_FORMAT

EXAMPLES_KEPT = 3
NULL_LIKE = ("nan", "null", "na", "none", "n/a")
"""Values read as missing (after trimming, any case) wherever a value is parsed (ids, codes,
dates, versions); drug names and titles are text, so a drug called 'NA' stays a drug."""

__all__ = ["DATE_COLUMNS", "RELEASE_DATE_FORMAT", "MimicError", "Rules", "TableReport", "repairs"]


class MimicError(ValueError):
    """The MIMIC tables cannot be loaded; the message names file, column, count and value."""


@dataclass(frozen=True)
class Rules:
    """What the loaders accept: one date format per column, the share of unparseable values
    a column may have before the run stops."""
    date_formats: Mapping[str, str] = field(default_factory=dict)
    max_bad_fraction: float = 0.01

    def date_format(self, column: str) -> str:
        return self.date_formats.get(column, RELEASE_DATE_FORMAT)

    @classmethod
    def of(cls, data) -> "Rules":
        """The rules of a `DataConfig`."""
        return cls(date_formats=dict(data.date_formats), max_bad_fraction=data.max_bad_fraction)


def _shown(value) -> str:
    return "" if value is None else str(value)


@dataclass
class TableReport:
    """What one table's load read, dropped, repaired and noted; `rules` decide the refusals."""
    file: str
    rules: Rules = field(default_factory=Rules, repr=False)
    rows_read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows left out, per reason ('missing or unparseable hadm_id', 'exact duplicate rows', ...)."""
    repaired: dict[str, int] = field(default_factory=dict)
    """Values changed (set to null, read another way), per reason; the row is kept."""
    unparseable: dict[str, int] = field(default_factory=dict)
    """Values present that could not be parsed, per column (rows dropped or the value set to
    null: see `dropped` / `repaired`); empty and null-like values are not counted here."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """A few unparseable values per column, to find them in the file."""
    reason_examples: dict[str, str] = field(default_factory=dict)
    """One example per drop / repair reason."""
    notes: dict[str, int] = field(default_factory=dict)
    """Counted, nothing changed (overlapping admissions, ages capped as the release does)."""
    columns: dict[str, str] = field(default_factory=dict)
    """The column each drop / repair reason is about (for the report and strict errors)."""

    def count_bad(self, column: str, raw: pa.Array, bad: np.ndarray) -> None:
        n = int(bad.sum())
        if not n:
            return
        self.unparseable[column] = self.unparseable.get(column, 0) + n
        shown = self.examples.setdefault(column, [])
        if len(shown) < EXAMPLES_KEPT:
            values = raw.filter(pa.array(bad)).slice(0, EXAMPLES_KEPT - len(shown)).to_pylist()
            shown.extend(_shown(v) for v in values)

    def unparseable_values(self, column: str, raw: pa.Array, bad: np.ndarray, required: bool) -> None:
        """Count a column's unparseable values; where the column is not required the values are
        set to null (a repair; a required column's rows are dropped by the caller)."""
        self.count_bad(column, raw, bad)
        if not required:
            self.repair(f"unparseable {column}: set to null", int(bad.sum()), column,
                        raw.filter(pa.array(bad))[0].as_py() if bad.any() else None)

    def _count(self, into: dict, reason: str, n: int, column: str | None, example) -> None:
        if not n:
            return
        into[reason] = into.get(reason, 0) + int(n)
        if column:
            self.columns.setdefault(reason, column)
        if example is not None and reason not in self.reason_examples:
            self.reason_examples[reason] = _shown(example)

    def drop(self, reason: str, n: int, column: str | None = None, example=None) -> None:
        """`n` rows dropped for `reason` (a repair)."""
        self._count(self.dropped, reason, n, column, example)

    def repair(self, reason: str, n: int, column: str | None = None, example=None) -> None:
        """`n` values changed for `reason`, rows kept (a repair)."""
        self._count(self.repaired, reason, n, column, example)

    def note(self, reason: str, n: int) -> None:
        """`n` rows with something worth knowing; nothing changed (not a repair)."""
        if n:
            self.notes[reason] = self.notes.get(reason, 0) + int(n)

    def check_bad_fraction(self) -> None:
        """MimicError if a column has more than `rules.max_bad_fraction` unparseable values."""
        for column, n in self.unparseable.items():
            if n > self.rules.max_bad_fraction * max(self.rows_read, 1):
                self.refuse(column, n, self.examples.get(column, [""])[0], *_what_parses(self.rules, column))

    def refuse(self, column: str, n: int, example, what: str, hint: str = "") -> None:
        """MimicError: `n` rows of `column` are `what` (more than the rules let be repaired)."""
        share = n / max(self.rows_read, 1)
        raise MimicError(
            f"{self.file}: column '{column}': {n} of {self.rows_read} row(s) ({share:.1%}) {what} "
            f"(e.g. {_shown(example)!r}); at most data.max_bad_fraction="
            f"{self.rules.max_bad_fraction:g} of a column may be repaired{hint}")

    def as_dict(self) -> dict:
        return {"file": self.file, "rows_read": self.rows_read, "dropped": self.dropped,
                "repaired": self.repaired, "unparseable": self.unparseable, "examples": self.examples,
                "notes": self.notes}

    def repair_list(self, table: str) -> list[dict]:
        out = []
        for kind, counts in (("row(s) dropped", self.dropped), ("value(s) repaired", self.repaired)):
            for reason, n in counts.items():
                out.append({"table": table, "file": self.file, "column": self.columns.get(reason),
                            "repair": reason, "kind": kind, "count": n,
                            "example": self.reason_examples.get(reason)})
        return out


def _what_parses(rules: Rules, column: str) -> tuple[str, str]:
    if column in DATE_COLUMNS:
        return (f"do not parse with the date format {rules.date_format(column)!r}",
                f"; if the file writes {column} another way, set data.date_formats.{column} to its format")
    return "do not parse", ""


def repairs(tables: Mapping[str, TableReport]) -> list[dict]:
    """Every repair of a load, table by table: table, file, column, repair, kind, count, example."""
    return [r for name, rep in tables.items() for r in rep.repair_list(name)]


# --- values ---------------------------------------------------------------------------------

def as_array(col) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def nullify(raw) -> pa.Array:
    """Trimmed strings with empty and null-like values (`NULL_LIKE`) as nulls."""
    trimmed = pc.utf8_trim_whitespace(as_array(raw))
    null_like = pc.or_(pc.equal(trimmed, ""), pc.is_in(pc.utf8_lower(trimmed), pa.array(NULL_LIKE)))
    return pc.if_else(pc.fill_null(null_like, True), pa.scalar(None, pa.string()), trimmed)


def first_null_like(raw, values: pa.Array, mask: np.ndarray | None = None):
    """One raw value that `nullify` turned into null (for an example), or None."""
    gone = values.is_null().to_numpy(zero_copy_only=False)
    if mask is not None:
        gone &= mask
    idx = np.flatnonzero(gone)
    return as_array(raw)[int(idx[0])].as_py() if len(idx) else None


def duplicate_mask(columns: Mapping[str, np.ndarray]) -> np.ndarray:
    """True for every row identical (in the given columns) to an earlier one."""
    # not at module level: pandas, loaded only when this runs
    import pandas as pd

    return pd.DataFrame(dict(columns)).duplicated().to_numpy()


def drop_exact_duplicates(table: pa.Table, report: TableReport, key: str) -> pa.Table:
    """`table` without rows identical in every column read; counted (example: the row's `key`)."""
    cols = {c: as_array(table[c]).to_numpy(zero_copy_only=False) for c in table.column_names}
    dup = duplicate_mask(cols)
    if dup.any():
        first = int(np.flatnonzero(dup)[0])
        report.drop(f"exact duplicate rows (same {', '.join(table.column_names)})", int(dup.sum()),
                    key, cols[key][first])
        table = table.filter(pa.array(~dup))
    return table


def check_leading_zeros(codes, dictionary_codes, events_file: str, dictionary_file: str, column: str) -> None:
    """MimicError if codes absent from the dictionary are there once zero-padded ('389' vs
    '0389'): a spreadsheet dropped the zeros, and which code was meant cannot be known."""
    # not at module level: pandas, loaded only when this runs
    import pandas as pd

    codes = pd.Series(codes, dtype=object)
    known = pd.Index(dictionary_codes)
    absent = codes[~codes.isin(known)]
    if absent.empty:
        return
    distinct = pd.unique(absent)
    lost = {c: z + c for c in distinct for z in ("0", "00", "000") if isinstance(c, str) and z + c in known}
    if lost:
        rows = int(absent.isin(list(lost)).sum())
        code, padded = next(iter(lost.items()))
        raise MimicError(
            f"{events_file}: column '{column}': {len(lost)} code(s) in {rows} row(s) are not in "
            f"{dictionary_file} but are with leading zeros (e.g. {code!r}, listed as {padded!r}): the "
            f"leading zeros were lost (opened in a spreadsheet?); which code was meant cannot be "
            f"known, so read the table again from the release")
