import pytest
import torch

from pruner.data import DataError, c4_documents, sample_windows, wikitext2_lines, wikitext2_text
from pruner.specs import CalibSpec


def test_wikitext_rows_match_hub_layout(data_dir):
    lines = wikitext2_lines("test", data_dir)
    assert len(lines) == 4358
    assert lines[0] == "" and lines[1] == " = Robert Boulter = \n"  # blank rows are '', others keep '\n'
    text = wikitext2_text("test", data_dir)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n")
    assert len(wikitext2_lines("validation", data_dir)) == 3760


def test_c4_documents(data_dir):
    docs = c4_documents(data_dir)
    assert len(docs) == 1480 and all(isinstance(d, str) and d for d in docs)


def test_missing_data_dir_names_layout(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        wikitext2_lines("test", tmp_path / "nope")
    with pytest.raises(DataError, match="has no c4/c4_sample_text.jsonl"):
        c4_documents(tmp_path)
    with pytest.raises(ValueError, match="split must be one of test, validation"):
        wikitext2_lines("train", tmp_path)


def test_bad_jsonl_line_is_reported(tmp_path):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4_sample_text.jsonl").write_text('{"text": "ok"}\n{"nottext": 1}\n')
    with pytest.raises(DataError, match=r"c4_sample_text.jsonl:2"):
        c4_documents(tmp_path)


@pytest.mark.parametrize("line,what", [('["a", "list"]', "got a list"),
                                       ('{"text": 12345}', "got an object whose 'text' is a int"),
                                       ('{"url": "x"}', "got an object without 'text'"), ('"just a string"', "got a str")])
def test_valid_json_that_is_not_a_document_is_named(tmp_path, line, what):
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4_sample_text.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=r"c4_sample_text.jsonl:2: expected a JSON object with a 'text' string; " + what):
        c4_documents(tmp_path)


def test_windows_are_seeded_and_exact():
    stream = torch.arange(1000)
    a = sample_windows(stream, 5, 100, seed=3)
    assert a.shape == (5, 100)
    assert torch.equal(a, sample_windows(stream, 5, 100, seed=3))
    assert not torch.equal(a, sample_windows(stream, 5, 100, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(5, 99, dtype=a.dtype))  # consecutive tokens
    with pytest.raises(DataError, match="fewer than seqlen=2000"):
        sample_windows(stream, 1, 2000, seed=0)


def test_calib_spec_validation_and_presets():
    assert CalibSpec.preset("paper").nsamples == 128 and CalibSpec.preset("paper").seqlen == 2048
    assert (CalibSpec().nsamples, CalibSpec().seqlen) == (32, 512)
    with pytest.raises(ValueError, match="preset must be one of tiny, cpu, paper"):
        CalibSpec.preset("huge")
    with pytest.raises(ValueError, match="nsamples must be an integer >= 1"):
        CalibSpec(nsamples=0)
    with pytest.raises(ValueError, match="dataset must be one of c4"):
        CalibSpec(dataset="pile")
    # where the local data sits does not change the cache key; local vs hub does
    assert CalibSpec(data_dir="/a").key() == CalibSpec(data_dir="/b").key() != CalibSpec(data_dir=None).key()


def test_c4_stream_is_reused_until_the_file_changes(smollm2, tmp_path, monkeypatch):
    """The tokenized C4 stream is kept per (tokenizer, file): equal to a fresh tokenization, read once, handed out
    as a copy (a caller's change does not reach the next caller), and a changed file is tokenized again."""
    import json
    import os

    import pruner.data
    from pruner.data import C4_FILE, c4_token_stream, token_stream

    reads = []
    real = pruner.data.c4_documents
    monkeypatch.setattr(pruner.data, "c4_documents", lambda d: reads.append(d) or real(d))
    path = tmp_path / C4_FILE
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["one two three", "four five"]))
    tok = smollm2.tokenizer
    first = c4_token_stream(tok, tmp_path)
    expected = token_stream(tok, ["one two three", "four five"])
    assert torch.equal(first, expected)
    first[0] = -1
    assert torch.equal(c4_token_stream(tok, tmp_path), expected) and len(reads) == 1  # reused, unchanged
    path.write_text(json.dumps({"text": "six seven eight nine"}))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a later modification time
    second = c4_token_stream(tok, tmp_path)
    assert torch.equal(second, token_stream(tok, ["six seven eight nine"]))


def test_wikitext2_ids_are_the_tokenized_text_and_tokenized_once(smollm2, data_dir, monkeypatch):
    """``wikitext2_ids`` is the tokenizer's own encoding of ``wikitext2_text`` (defaults: the papers' protocol), read
    once per process and handed out as a copy; an unknown split is refused by name."""
    import pruner.data
    from pruner.data import wikitext2_ids, wikitext2_text

    reads = []
    real = pruner.data.wikitext2_text
    monkeypatch.setattr(pruner.data, "wikitext2_text", lambda *a: reads.append(a) or real(*a))
    expected = smollm2.tokenizer(wikitext2_text("validation", data_dir), return_tensors="pt").input_ids[0]
    first = wikitext2_ids(smollm2.tokenizer, "validation", data_dir)
    assert torch.equal(first, expected) and first.dtype == torch.int64
    first[:10] = -1
    again = wikitext2_ids(smollm2.tokenizer, "validation", data_dir)
    assert torch.equal(again, expected) and len(reads) <= 1  # at most the first call read it (a kept one: none)
    with pytest.raises(ValueError, match="must be one of"):
        wikitext2_ids(smollm2.tokenizer, "train", data_dir)
