"""`make results` (bench/results.py): the generated sections of docs/results.md and their generators."""

from pathlib import Path

import numpy as np
import pytest

from bench import results

DOC = """# Title
intro
<!-- generated: a -->
old a
<!-- end generated: a -->
between
<!-- generated: b -->
<!-- end generated: b -->
tail
"""


def test_replace_section_changes_only_the_named_section():
    out = results.replace_section(DOC, "a", "new a\nline 2\n")
    assert out == DOC.replace("old a\n", "new a\nline 2\n")
    out = results.replace_section(out, "b", "B")
    assert out == ("# Title\nintro\n<!-- generated: a -->\nnew a\nline 2\n<!-- end generated: a -->\nbetween\n"
                   "<!-- generated: b -->\nB\n<!-- end generated: b -->\ntail\n")
    # replacing again is idempotent
    assert results.replace_section(out, "b", "B") == out


def test_generated_sections_in_order():
    assert results.generated_sections(DOC) == ["a", "b"]


@pytest.mark.parametrize("text, message", [
    ("<!-- generated: a -->\n", "has no end marker"),
    ("<!-- end generated: a -->\n", "without its start"),
    ("<!-- generated: a -->\n<!-- generated: b -->\n<!-- end generated: b -->\n<!-- end generated: a -->\n",
     "starts inside 'a'"),
    ("<!-- generated: a -->\n<!-- end generated: a -->\n<!-- generated: a -->\n<!-- end generated: a -->\n",
     "appears twice"),
])
def test_malformed_markers_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        results.generated_sections(text)


def test_the_results_document_and_the_generators_match():
    """Every marked section of docs/results.md has a generator and every generator has a section."""
    assert results.check(results.RESULTS_MD.read_text()) == []
    assert results.check(DOC) == [
        f"section 'a' has no generator (known: {', '.join(results.GENERATORS)})",
        f"section 'b' has no generator (known: {', '.join(results.GENERATORS)})",
    ] + [f"generator {n!r} has no section in the document" for n in results.GENERATORS]


class _HandMadeLOD:
    """Three blocks whose outlier shares are known exactly."""

    n_blocks = 3
    _table = {3.0: [0.05, 0.04, 0.03], 5.0: [0.02, 0.01, 0.005], 7.0: [0.001, 0.0, 0.0025]}

    def lod(self, m):
        return np.array(self._table[m])


def test_lod_table_on_hand_made_shares(tmp_path: Path):
    session = results.Session("unused", tmp_path)
    session._memo["stats"] = _HandMadeLOD()
    assert results.lod_table(session) == (
        "| block | M=3 | M=5 | M=7 | | block | M=3 | M=5 | M=7 |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        "| 0 | 5.000 | 2.000 | 0.100 | | 2 | 3.000 | 0.500 | 0.250 |\n"
        "| 1 | 4.000 | 1.000 | 0.000 | | | | | | |"
    )


def test_cli_check_and_a_bad_file(tmp_path: Path, capsys):
    assert results.main(["--check"]) == 0
    bad = tmp_path / "r.md"
    bad.write_text(DOC)
    assert results.main(["--file", str(bad)]) == 1
    assert "section 'a' has no generator" in capsys.readouterr().err
    assert bad.read_text() == DOC  # nothing written


def test_the_stamp_is_not_dirtied_by_the_document_it_writes(tmp_path: Path):
    """A real git repository: an edited docs/results.md (the tables the run has already written) leaves the tree
    clean for the stamp; an edited code file does not."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=tmp_path,
                       check=True, capture_output=True)

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text("tables\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    assert not results._dirty(tmp_path / "docs")
    (tmp_path / "docs" / "results.md").write_text("tables, regenerated\n")
    assert not results._dirty(tmp_path / "docs")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert results._dirty(tmp_path / "docs")
