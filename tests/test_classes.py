import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lbgen.data.classes import ClassTableError, load_class_table


def test_imagenet_table_ships_with_duplicate_names_as_distinct_labels():
    table = load_class_table("imagenet1k")
    assert len(table) == 1000
    assert table.ids[0] == "n01440764" and table.names[0] == "tench"
    missiles = [label for label, name in enumerate(table.names) if name == "missile"]
    assert missiles == [657, 744]
    assert table.ids[657] != table.ids[744]


def test_tiny_table_and_prompts():
    table = load_class_table("tiny10")
    assert len(table) == 10
    assert table.prompts("photo of {name}")[0] == "photo of tench"


def test_txt_csv_parquet_agree(tmp_path):
    rows = [("a1", "red fox"), ("b2", 'a "quoted", name'), ("c3", "red fox")]
    (tmp_path / "t.txt").write_text("".join(f"{i} {n}\n" for i, n in rows) + "\n")
    import csv

    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class_id", "class_name", "extra"])
        writer.writerows([(i, n, "x") for i, n in rows])
    pq.write_table(pa.table({"class_id": [r[0] for r in rows], "class_name": [r[1] for r in rows]}), tmp_path / "t.parquet")
    tables = [load_class_table(tmp_path / f"t.{ext}") for ext in ("txt", "csv", "parquet")]
    for table in tables:
        assert table.ids == ("a1", "b2", "c3")
        assert table.names == ("red fox", 'a "quoted", name', "red fox")


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("dup.txt", b"a x\nb y\na z\n", "dup.txt:3: duplicate class_id 'a'"),
        ("blank.csv", b"class_id,class_name\na,x\nb,\n", "blank.csv:3: blank class_name"),
        ("empty.txt", b"\n\n", "empty"),
        ("oneword.txt", b"a x\nlonely\n", "oneword.txt:2: expected 'class_id class_name'"),
        ("bytes.txt", b"a x\nb \xff\xfe\n", "bytes.txt:2: not valid UTF-8"),
        ("nohead.csv", b"id,name\n1,x\n", "lacks column(s) class_id, class_name"),
        ("bad.parquet", b"not parquet", "not a readable Parquet file"),
        ("table.json", b"{}", "unknown extension"),
    ],
)
def test_bad_tables_name_file_and_line(tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ClassTableError) as err:
        load_class_table(path)
    assert needle in str(err.value)


def test_missing_table_names_the_path(tmp_path):
    with pytest.raises(ClassTableError, match="not found"):
        load_class_table(tmp_path / "nope.txt")


@pytest.mark.parametrize("spec", ["", "  "])
def test_an_empty_table_name_is_refused_as_empty_not_as_the_current_directory(spec):
    with pytest.raises(ClassTableError, match="classes is empty") as err:
        load_class_table(spec)
    assert "directory" not in str(err.value)
