"""Documents in, streamed: JSONL line by line, parquet batch by batch; chunks; a resumable label file.

Plumbing for curate.py pretrain, whose memory must stay bounded by the chunk size, not by the corpus:
documents are read one at a time (parquet needs the optional pyarrow and reads only the text and id
columns), requests go out a chunk at a time, and the label file is the progress record that a rerun
resumes from. Nothing here imports a core file.
"""

import json
import os
import sys
from pathlib import Path

from plumbing.files import read_jsonl, write_jsonl


def _open_parquet(f):
    try:
        import pyarrow.parquet as pq  # optional: only parquet input needs it
    except ImportError:
        raise ValueError(f"{f} is parquet, which needs the optional package pyarrow: pip install "
                         "pyarrow (or convert the file to JSONL)") from None
    return pq.ParquetFile(f)


def _rows(f, text_field, id_field, batch_rows):
    """Rows of one file as dicts, streamed: JSONL line by line, parquet batch_rows rows at a time
    (only the text and id columns are read)."""
    if f.suffix == ".parquet":
        pf = _open_parquet(f)
        names = list(pf.schema_arrow.names)
        if text_field not in names:
            raise ValueError(f"{f} has no column {text_field!r} (it has {', '.join(names)}); set "
                             "--text-field")
        cols = [text_field] + ([id_field] if id_field in names and id_field != text_field else [])
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            yield from batch.to_pylist()
        return
    with open(f, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{n}: not valid JSON ({e}); fix or remove that line") from None


def iter_documents(path, text_field="text", id_field="id", batch_rows=1024):
    """Yield {"id", "text"} one document at a time from a JSONL file, a parquet file (needs
    pyarrow) or a folder of them. A row without the id field gets "<file stem>:<row index>"; ids
    must be unique (checked as they stream by)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(list(p.glob("*.jsonl")) + list(p.glob("*.parquet")))
        if not files:
            raise FileNotFoundError(f"no *.jsonl or *.parquet files in {p}")
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"--input {p} does not exist")
    seen = set()
    for f in files:
        for i, r in enumerate(_rows(f, text_field, id_field, batch_rows)):
            if not isinstance(r, dict) or r.get(text_field) is None:
                raise ValueError(f"{f} row {i + 1} has no {text_field!r} field; set --text-field")
            doc_id = r.get(id_field)
            if doc_id is None:
                doc_id = f"{f.stem}:{i}"
            if str(doc_id) in seen:
                raise ValueError(f"document id {doc_id!r} appears twice in {p}; set --id-field to a "
                                 "unique field, or drop the field to number rows by position")
            seen.add(str(doc_id))
            yield dict(id=doc_id, text=str(r[text_field]))


def read_documents(path, text_field="text", id_field="id"):
    """All documents as a list (iter_documents, for small inputs and tests)."""
    return list(iter_documents(path, text_field, id_field))


def chunks(items, n):
    """Lists of n items (the last may be shorter) from any iterable, consumed lazily."""
    chunk = []
    for x in items:
        chunk.append(x)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load_labels(path):
    """{id: label row} from a label file; a later row for the same id wins (a retried document)."""
    done = {}
    path = Path(path)
    if path.exists() and path.stat().st_size:
        for row in read_jsonl(path):  # skips a line torn by a kill ...
            done[str(row["id"])] = row
        with open(path, "rb+") as f:  # ... which is cut off, so the next append starts clean
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - (1 << 16))  # a label line is well under 64 KB
            f.seek(start)
            tail = f.read()
            if not tail.endswith(b"\n"):
                f.truncate(start + tail.rfind(b"\n") + 1)
    return done


def label_resumably(docs, labels_path, chunk_docs, label):
    """Label documents a chunk at a time, resumably -> (label rows in input order, how many labelled now).

    label(chunk, n_done) -> one label row per document. Rows are appended to labels_path as each chunk
    finishes (the file is the progress record); a document already there without a failed request is
    skipped, and at the end the file is compacted to one row per document, in input order."""
    done = load_labels(labels_path)
    order, n_new, n_skipped = [], 0, 0

    def todo():
        nonlocal n_skipped
        for d in docs:
            key = str(d["id"])
            order.append(key)
            if key in done and not done[key].get("failed"):
                n_skipped += 1
                continue
            yield d
    for chunk in chunks(todo(), chunk_docs):
        rows = label(chunk, n_new)
        with open(labels_path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                done[str(row["id"])] = row
        n_new += len(rows)
        print(f"[curate] labelled {n_new} document(s) this run, {n_skipped} already done",
              file=sys.stderr)
    labels = [done[k] for k in order]
    done.clear()  # only the label rows in input order stay in memory
    write_jsonl(labels_path, labels)  # compacted: one row per document, input order
    return labels, n_new
