"""Class tables: the list of category names a dataset is generated for.

Formats (label = row order, never the name: ImageNet has two "missile" rows):
- `.txt`: one `class_id class_name` per line, split at the first whitespace;
  blank lines are skipped.
- `.csv`: a header with `class_id,class_name` (other columns ignored).
- `.parquet`: columns `class_id`, `class_name`.
Shipped tables are named without a path: `imagenet1k` (1000 rows), `tiny10`, `fashion10` (Fashion-MNIST, its label order).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lbgen.errors import ClassTableError  # noqa: F401  (raised here; defined with the others)

SHIPPED_TABLES = ("imagenet1k", "tiny10", "fashion10")


@dataclass(frozen=True)
class ClassTable:
    ids: tuple[str, ...]
    names: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.names)

    def prompts(self, template: str) -> list[str]:
        """`template` (containing `{name}`) filled with every class name, in label order."""
        return [template.format(name=name) for name in self.names]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ClassTableError(f"{path}:{line}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _rows_from_txt(path: Path) -> list[tuple[int, str, str]]:
    rows = []
    # Lines end at "\n" only: str.splitlines would also break inside a name at \x1c, \x85, \u2028 ...
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) < 2:
            raise ClassTableError(f"{path}:{lineno}: expected 'class_id class_name', got {line.strip()!r}")
        rows.append((lineno, parts[0], parts[1].strip()))
    return rows


def _rows_from_csv(path: Path) -> list[tuple[int, str, str]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    missing = {"class_id", "class_name"} - set(reader.fieldnames or ())
    if missing:
        raise ClassTableError(f"{path}:1: header lacks column(s) {', '.join(sorted(missing))}")
    # Line numbers count the header as line 1.
    try:
        return [(reader.line_num, row["class_id"] or "", row["class_name"] or "") for row in reader]
    except csv.Error as err:  # e.g. a field over csv's size limit (131 072 characters)
        raise ClassTableError(f"{path}: not valid CSV after line {reader.line_num} ({err})") from None


def _rows_from_parquet(path: Path) -> list[tuple[int, str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise ClassTableError(f"{path}: not a readable Parquet file ({err})") from None
    missing = {"class_id", "class_name"} - set(table.column_names)
    if missing:
        raise ClassTableError(f"{path}: lacks column(s) {', '.join(sorted(missing))}")
    for column, allowed in (("class_id", (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer)),
                            ("class_name", (pa.types.is_string, pa.types.is_large_string))):
        kind = table.schema.field(column).type
        if not any(test(kind) for test in allowed):
            raise ClassTableError(f"{path}: column {column} is {kind}, expected strings" + (" or integers" if column == "class_id" else ""))
    ids = [str(v) if v is not None else "" for v in table.column("class_id").to_pylist()]
    names = [v if v is not None else "" for v in table.column("class_name").to_pylist()]
    return [(i + 1, cid, name) for i, (cid, name) in enumerate(zip(ids, names))]


_READERS = {".txt": _rows_from_txt, ".csv": _rows_from_csv, ".parquet": _rows_from_parquet}


def _check(path: Path, rows: list[tuple[int, str, str]], where: str) -> ClassTable:
    if not rows:
        raise ClassTableError(f"{path}: the class table is empty")
    rows = [(lineno, str(cid).strip(), name) for lineno, cid, name in rows]  # " a" and "a" are one id
    first_seen: dict[str, int] = {}
    for lineno, cid, name in rows:
        if not cid:
            raise ClassTableError(f"{path}:{lineno}: blank class_id ({where})")
        if not name.strip():
            raise ClassTableError(f"{path}:{lineno}: blank class_name for class_id {cid!r}")
        if cid in first_seen:
            raise ClassTableError(f"{path}:{lineno}: duplicate class_id {cid!r} (first at {where} {first_seen[cid]})")
        first_seen[cid] = lineno
    return ClassTable(
        ids=tuple(cid for _, cid, _ in rows),
        names=tuple(name.strip() for _, _, name in rows),
        source=str(path),
    )


def load_class_table(spec: str | Path) -> ClassTable:
    """Load a class table from a shipped name or a `.txt` / `.csv` / `.parquet` path."""
    if str(spec) in SHIPPED_TABLES:
        ref = resources.files("lbgen") / "data" / f"{spec}_classes.txt"
        with resources.as_file(ref) as path:
            return _check(path, _rows_from_txt(path), "line")
    if not str(spec).strip():
        # Path("") is ".", which would be refused as a directory the user never named.
        raise ClassTableError(f"classes is empty: name a shipped table ({', '.join(SHIPPED_TABLES)}) or a .txt, .csv or .parquet file")
    path = Path(spec)
    if not path.exists():
        raise ClassTableError(f"class table not found: {path} (shipped tables: {', '.join(SHIPPED_TABLES)})")
    if path.is_dir():
        raise ClassTableError(f"class table {path} is a directory; expected a .txt, .csv or .parquet file")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise ClassTableError(f"class table {path}: unknown extension {path.suffix!r}; use .txt, .csv or .parquet")
    return _check(path, reader(path), "row" if path.suffix.lower() == ".parquet" else "line")
