"""Chat dataset rows -> Conversations: every format from JSONL, Parquet and a `save_to_disk`
directory, and the one-line error (file and 1-based row) for every kind of bad row."""

import json
import re
import sys

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stagewise.data.conversations import Conversation, read_conversations
from stagewise.errors import DataError


USER, ASSISTANT = {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}
SYSTEM = {"role": "system", "content": "Be brief."}

# (rows, the conversations they must give: messages, completion_only, extra)
FORMATS = {
    "messages": ([{"messages": [SYSTEM, USER, ASSISTANT], "id": "a"},
                  {"messages": [USER, ASSISTANT, USER, {"role": "assistant", "content": "8", "name": "bot"}],
                   "id": "b"}],
                 [([SYSTEM, USER, ASSISTANT], False, {"id": "a"}),
                  ([USER, ASSISTANT, USER, {"role": "assistant", "content": "8", "name": "bot"}], False, {"id": "b"})]),
    "prompt-completion": ([{"prompt": "2+2?", "completion": "4", "answer": "4"}],
                          [([USER, ASSISTANT], True, {"answer": "4"})]),
    "conversational-prompt-completion": ([{"prompt": [SYSTEM, USER], "completion": [ASSISTANT]}],
                                         [([SYSTEM, USER, ASSISTANT], True, {})]),
    "alpaca": ([{"instruction": "Add.", "input": "2+2", "output": "4"},
                {"instruction": "Say hi.", "input": "", "output": "hi"},
                {"instruction": "Say hi.", "input": None, "output": "hi", "category": "greet"}],
               [([{"role": "user", "content": "Add.\n\n2+2"}, ASSISTANT], False, {}),
                ([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}], False, {}),
                ([{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}], False,
                 {"category": "greet"})]),
    "sharegpt": ([{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                                     {"from": "gpt", "value": "4"}]}],
                 [([SYSTEM, USER, ASSISTANT], False, {})]),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")  # a trailing blank line is no row
    return path


def write_parquet(path, rows):
    """Rows as a Parquet table: every row has every column (null where its JSON had no such key)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), path)
    return path


def check(convs, expected, name):
    assert [(c.messages, c.completion_only, c.extra) for c in convs] == expected
    assert all(isinstance(c, Conversation) for c in convs)
    assert [c.source for c in convs] == [f"{name}:{i}" for i in range(1, len(expected) + 1)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_from_jsonl_and_parquet(tmp_path, fmt):
    rows, expected = FORMATS[fmt]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    check(list(read_conversations(f)), expected, f)
    f = write_parquet(tmp_path / "chat.parquet", rows)
    # Parquet structs give every message every key some message has (null where absent): dropped.
    check(list(read_conversations(f)), expected, f)


def test_forced_format_and_directories(tmp_path):
    rows, expected = FORMATS["alpaca"]
    # An alpaca row that also has a "prompt" field is detected as prompt/completion unless forced.
    forced = [{**r, "prompt": "unused"} for r in rows]
    f = write_jsonl(tmp_path / "a.jsonl", forced)
    convs = list(read_conversations(f, format="alpaca"))
    assert [c.messages for c in convs] == [e[0] for e in expected]
    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "b.jsonl", FORMATS["sharegpt"][0])
    write_parquet(d / "a.parquet", FORMATS["prompt-completion"][0])
    (d / "notes.txt").write_text("ignored")
    assert [c.source for c in read_conversations(d)] == [f"{d / 'a.parquet'}:1", f"{d / 'b.jsonl'}:1"]
    assert [c.source for c in read_conversations(d, glob="*.jsonl")] == [f"{d / 'b.jsonl'}:1"]


def test_prompt_only_rows_when_no_assistant_is_required(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "2+2?", "answer": "4"}])
    [conv] = read_conversations(f, require_assistant=False)
    assert conv.messages == [USER] and conv.extra == {"answer": "4"}
    with pytest.raises(DataError, match=re.escape(f"{f}:1: no field 'completion'")):
        list(read_conversations(f))


def test_save_to_disk_directories(tmp_path):
    rows, expected = FORMATS["messages"]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    check(list(read_conversations(tmp_path / "ds")), expected, tmp_path / "ds")
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                 "test": datasets.Dataset.from_list(FORMATS["sharegpt"][0])})
    both.save_to_disk(str(tmp_path / "dd"))
    check(list(read_conversations(tmp_path / "dd")), expected, f"{tmp_path / 'dd'}[train]")
    assert [c.source for c in read_conversations(tmp_path / "dd", split="test")] == [f"{tmp_path / 'dd'}[test]:1"]
    with pytest.raises(DataError, match=r"has no split 'val' \(splits: train, test\)"):
        list(read_conversations(tmp_path / "dd", split="val"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "t"))
    with pytest.raises(DataError, match="holds splits test and none named 'train'; choose a split"):
        list(read_conversations(tmp_path / "t"))


def test_save_to_disk_without_datasets_installed(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"^sft: .* is a Hugging Face datasets directory \(save_to_disk\); "
                                        "reading it needs the datasets package"):
        list(read_conversations(tmp_path / "ds", where="sft"))


BAD_ROWS = [
    ({"messages": [USER]}, "no assistant message to train on (roles: user); SFT needs at least one"),
    ({"messages": [USER, {"role": "bot", "content": "4"}]},
     "messages[2]: unknown role 'bot'; valid roles: system, user, assistant, tool"),
    ({"messages": [USER, {"role": "assistant"}]}, "messages[2]: content must be a string, got nothing (missing or null)"),
    ({"messages": [USER, {"role": "assistant", "content": 4}]}, "messages[2]: content must be a string, got int"),
    ({"messages": []}, "'messages' must be a non-empty list of {role, content} messages, got an empty list"),
    ({"messages": ["hi"]}, "messages[1] must be an object with role and content, got str"),
    ({"prompt": "2+2?"}, "no field 'completion' (fields: prompt)"),
    ({"prompt": [USER], "completion": [USER]}, "the completion has no assistant message (roles: user); it is what SFT trains on"),
    ({"prompt": 4, "completion": "4"}, "'prompt' must be a non-empty list of {role, content} messages, got int"),
    ({"instruction": "Add.", "output": 4}, "'output' must be a string, got int"),
    ({"instruction": "Add."}, "no field 'output' (alpaca rows need instruction and output)"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "4"}]},
     "conversations[2]: unknown 'from' 'bot'; valid: human, user, gpt, assistant, system, tool"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]},
     "conversations[2]: value must be a string, got nothing (missing or null)"),
    ({"text": "hello", "label": 1}, "cannot tell the conversation format from the fields (label, text); expected "
                                    "messages, prompt + completion, instruction + output (alpaca) or conversations "
                                    "(sharegpt), or set the format (messages | prompt-completion | alpaca | sharegpt)"),
]


@pytest.mark.parametrize("row,message", BAD_ROWS)
def test_bad_rows_name_the_file_and_row(tmp_path, row, message):
    good = FORMATS["messages"][0][0] if "messages" in row else FORMATS["sharegpt"][0][0] if "conversations" in row \
        else {"prompt": "a", "completion": "b"} if "prompt" in row else {"instruction": "a", "output": "b"}
    if "text" in row:  # undetectable: it is the file's first row
        good = row
    f = write_jsonl(tmp_path / "bad.jsonl", [good, row])
    lineno = 1 if good is row else 2
    with pytest.raises(DataError, match=f"^sft.data: {re.escape(str(f))}:{lineno}: {re.escape(message)}$"):
        list(read_conversations(f, where="sft.data"))
    if good is row:
        return
    try:
        f = write_parquet(tmp_path / "bad.parquet", [good, row])
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return  # a column cannot mix these types (an int content among strings): only JSONL can hold the row
    with pytest.raises(DataError, match=f"^{re.escape(str(f))}:2: {re.escape(message)}$"):
        list(read_conversations(f))


def test_unreadable_inputs(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps(FORMATS["messages"][0][0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=re.escape(f"{f}:3: not valid JSON (Expecting property name enclosed in "
                                                  "double quotes at column 2); expected one JSON object per line")):
        list(read_conversations(f))
    f.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=re.escape(f"{f}:1: expected a JSON object, got list")):
        list(read_conversations(f))
    f.write_bytes(b'{"messages": "\xff"}\n')
    with pytest.raises(DataError, match=re.escape(f"{f}:1: not valid UTF-8")):
        list(read_conversations(f))
    f.write_text("\n")
    with pytest.raises(DataError, match="contains no conversations"):
        list(read_conversations(f))
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="x.parquet is not a readable parquet file"):
        list(read_conversations(tmp_path / "x.parquet"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x.csv: not a conversation file; expected \.jsonl, \.parquet"):
        list(read_conversations(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="does not exist"):
        list(read_conversations(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"contains no conversations \(no \*.jsonl or \*.parquet files\)"):
        list(read_conversations(tmp_path / "empty"))
    with pytest.raises(DataError, match="unknown conversation format 'chatml'; valid: messages, prompt-completion"):
        list(read_conversations(tmp_path / "x.jsonl", format="chatml"))
