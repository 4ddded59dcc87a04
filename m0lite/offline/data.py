"""The offline jobs' files: BEIR folders, TREC runs and tables of (query, document) pairs.

A query or document is handed on as the Reranker takes it: a str (text) or
{"image": path_or_url}, and a document also {"image": ..., "text": ...} or a PDF,
{"pdf": path_or_url, "pages": "1-20"}. Relative image and PDF paths are resolved
against the folder of the file that names them, so a job can be started from anywhere.

Readers never drop a row silently: a row they cannot use becomes a `BadRow`
naming its file and line, and the caller decides whether that is fatal.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

URL_PREFIXES = ("http://", "https://", "data:")


@dataclass(frozen=True)
class BadRow:
    where: str  # "file:line"
    message: str
    line: int | None = None  # the line (or parquet row), where the reader knows it

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def image_source(value, base: Path, noun: str = "image"):
    """An image (or PDF) field -> what load_image (read_pdf) takes: URLs and data URIs as they are, a relative
    path resolved against `base` when that file exists (anything else, e.g. base64, as it is)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{noun} must be a non-empty string (path, URL or data URI), got {value!r}"[:300])
    if value.startswith(URL_PREFIXES) or len(value) >= 4096:
        return value
    path = Path(value)
    if not path.is_absolute() and (base / path).exists():
        return str((base / path).resolve())
    return value


def _text_lines(path: Path):
    """(line number, line) for each non-blank line of a UTF-8 file."""
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line.rstrip("\n")


def _columns(path: Path, sep: str | None, count: int, expected: str, bad: list[BadRow], header: str | None = None):
    """(line number, columns) of each line of a table file split by `sep` that has `count` columns; a line
    with another count becomes a BadRow ("expected {expected}"). A first line whose first column is
    `header` is skipped."""
    for n, line in _text_lines(path):
        cols = line.split(sep)
        if n == 1 and header is not None and cols[0] == header:
            continue
        if len(cols) != count:
            bad.append(BadRow(f"{path}:{n}", f"expected {expected}, got {len(cols)}"))
            continue
        yield n, cols


def _json_lines(path: Path):
    """(line number, parsed object or the error text) for each non-blank line."""
    for n, line in _text_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, f"not JSON ({e.msg} at column {e.colno})"
            continue
        yield n, obj if isinstance(obj, dict) else f"not a JSON object (got {type(obj).__name__})"


# ---- BEIR ---------------------------------------------------------------------------------------


@dataclass
class Beir:
    """The parts of a BEIR folder a reranking needs: queries, the wanted documents, judgments."""

    queries: dict  # query id -> str or {"image": ...}
    corpus: dict  # document id -> str or {"image": ...}
    qrels: dict  # query id -> {document id: grade}
    bad: list[BadRow]


def pdf_document(src, pages, base: Path) -> dict:
    """A row's PDF and its optional pages ("3", 3, "1-20") -> the Reranker's {"pdf": ..., "pages": ...}. The
    pages are checked against the PDF when it is opened, as the Python API does."""
    if pages is not None and (isinstance(pages, bool) or not isinstance(pages, (str, int))):
        raise ValueError(f"'pages' must be a string such as '1-20' or a page number, got {type(pages).__name__}")
    doc = {"pdf": image_source(src, base, "pdf")}
    return doc if pages is None else {**doc, "pages": pages}


def _beir_input(obj: dict, base: Path):
    """A BEIR row -> the Reranker's input: its PDF (with its 'pages', e.g. one page of a report in a
    ViDoRe-style set of pages) or its image where it has one, else title and text joined as BEIR's own
    rerankers join them."""
    if obj.get("pdf"):
        return pdf_document(obj["pdf"], obj.get("pages"), base)
    if obj.get("image"):
        return {"image": image_source(obj["image"], base)}
    title, text = obj.get("title") or "", obj.get("text") or ""
    if not isinstance(title, str) or not isinstance(text, str):
        raise ValueError("'title' and 'text' must be strings")
    return f"{title} {text}".strip()


def _beir_rows(path: Path, wanted: set | None, bad: list[BadRow]) -> dict:
    out = {}
    for n, obj in _json_lines(path):
        if isinstance(obj, str):
            bad.append(BadRow(f"{path}:{n}", obj))
            continue
        key = obj.get("_id")
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            bad.append(BadRow(f"{path}:{n}", "no '_id' (string)"))
            continue
        key = str(key)
        if wanted is not None and key not in wanted:
            continue
        try:
            out[key] = _beir_input(obj, path.parent)
        except ValueError as e:
            bad.append(BadRow(f"{path}:{n}", str(e)))
    return out


def read_qrels(path: Path) -> tuple[dict, list[BadRow]]:
    """BEIR's qrels/SPLIT.tsv (query-id, corpus-id, score; a header line) -> {qid: {docid: grade}}."""
    qrels, bad = {}, []
    expected = "3 tab-separated columns (query-id, corpus-id, score)"
    for n, cols in _columns(path, "\t", 3, expected, bad, header="query-id"):
        try:
            grade = int(cols[2])
        except ValueError:
            bad.append(BadRow(f"{path}:{n}", f"score {cols[2]!r} is not an integer"))
            continue
        qrels.setdefault(cols[0], {})[cols[1]] = grade
    return qrels, bad


def read_beir(folder: Path, split: str, wanted_docs: set) -> Beir:
    """queries.jsonl, the documents of corpus.jsonl in wanted_docs (a corpus can be far larger than
    what a run retrieves) and qrels/SPLIT.tsv."""
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (folder / name).is_file():
            raise InputError(f"{folder}: no {name} (a BEIR folder has corpus.jsonl, queries.jsonl and qrels/{split}.tsv)")
    bad: list[BadRow] = []
    qrels, qbad = read_qrels(folder / "qrels" / f"{split}.tsv")
    queries = _beir_rows(folder / "queries.jsonl", None, bad)
    corpus = _beir_rows(folder / "corpus.jsonl", wanted_docs, bad)
    return Beir(queries, corpus, qrels, qbad + bad)


# ---- TREC runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    doc_id: str
    score: float
    line: int


def read_run(path: Path) -> tuple[dict[str, list[Candidate]], list[BadRow]]:
    """A TREC run (qid Q0 docid rank score tag) -> {qid: candidates}, queries in order of first
    appearance, each query's candidates best first (by score; ties keep the file's order)."""
    run: dict[str, list[Candidate]] = {}
    seen, bad = set(), []
    for n, cols in _columns(path, None, 6, "6 columns (qid Q0 docid rank score tag)", bad):
        try:
            score = float(cols[4])
        except ValueError:
            bad.append(BadRow(f"{path}:{n}", f"score {cols[4]!r} is not a number"))
            continue
        if not math.isfinite(score):
            bad.append(BadRow(f"{path}:{n}", f"score {cols[4]!r} is not finite"))
            continue
        if (cols[0], cols[2]) in seen:
            bad.append(BadRow(f"{path}:{n}", f"document {cols[2]} appears twice for query {cols[0]}"))
            continue
        seen.add((cols[0], cols[2]))
        run.setdefault(cols[0], []).append(Candidate(cols[2], score, n))
    for cands in run.values():
        cands.sort(key=lambda c: -c.score)  # stable: ties keep the file's order
    return run, bad


def trec_lines(qid: str, ranked: list[tuple[str, float]], tag: str) -> str:
    """TREC lines for one query's (docid, score), best first. repr() writes the shortest string that
    reads back as the same float, so a score survives the file exactly."""
    return "".join(f"{qid} Q0 {doc} {rank} {score!r} {tag}\n" for rank, (doc, score) in enumerate(ranked, 1))


# ---- pair tables --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    row: int  # 1-based line (jsonl) or row (parquet) in the input
    id: object  # the row's "id" if it has one, else None
    query: object  # str or {"image": ...}
    document: object


PAIR_FIELDS = ("a row has 'query' or 'query_image', 'document' or 'document_image' (both: a document of an "
               "image and its text) or 'document_pdf' (with 'pages' optional), and optionally 'id'")


def _side(obj: dict, name: str, base: Path, allow_empty: bool):
    """A row's query or document as the Reranker takes it. Only a document may hold an image and text
    together (the prompt has no place for a query of both)."""
    text, image = obj.get(name), obj.get(f"{name}_image")
    both = name == "document"
    pdf = obj.get("document_pdf") if both else None
    if both and isinstance(text, dict) and "pdf" in text:  # {"pdf": ..., "pages": ...}, as the Python API takes it
        pdf, text = text, None
        if set(pdf) - {"pdf", "pages"} or obj.get("pages") is not None:
            raise ValueError(f"'document' as a PDF is {{'pdf': ..., 'pages': ...}}, got keys {sorted(map(str, pdf))}"
                             + (" and 'pages'" if obj.get("pages") is not None else ""))
        return pdf_document(pdf["pdf"], pdf.get("pages"), base)
    if pdf is not None:
        if text is not None or image is not None:
            raise ValueError(f"give exactly one of 'document', 'document_image' and 'document_pdf' ({PAIR_FIELDS})")
        return pdf_document(pdf, obj.get("pages"), base)
    if isinstance(text, dict):  # {"text": ...}, {"image": ...} (or, a document, both), as the Python API takes them
        keys = set(text)
        if not keys or keys - {"text", "image"} or (keys == {"text", "image"} and not both) or image is not None:
            allowed = "{'text': ...}, {'image': ...}" + (" or both" if both else "")
            raise ValueError(f"'{name}' as an object must be {allowed}, got keys {sorted(map(str, keys))}"
                             + (f" and '{name}_image'" if image is not None else ""))
        text, image = text.get("text"), text.get("image")
    if (text is None and image is None) or (text is not None and image is not None and not both):
        raise ValueError(f"give exactly one of '{name}' and '{name}_image' ({PAIR_FIELDS})")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"'{name}' must be a string, got {type(text).__name__}")
    if image is not None:
        doc = {"image": image_source(image, base)}
        return doc if text is None else {**doc, "text": text}
    if not allow_empty and not text.strip():
        raise ValueError(f"'{name}' is empty")
    return text


def _pair(obj: dict, row: int, base: Path) -> Pair:
    rid = obj.get("id")
    if rid is not None and (not isinstance(rid, (str, int)) or isinstance(rid, bool)):
        raise ValueError(f"'id' must be a string or an integer, got {type(rid).__name__}")
    document = _side(obj, "document", base, True)
    if obj.get("pages") is not None and not (isinstance(document, dict) and "pdf" in document):
        raise ValueError("'pages' goes with 'document_pdf' only")
    return Pair(row, rid, _side(obj, "query", base, False), document)


def pairs_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise InputError(f"{path}: unknown format {suffix!r}; use .jsonl or .parquet")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InputError("parquet files need pyarrow: pip install 'm0lite[parquet]'") from None
    return pyarrow


def read_pairs(path: Path) -> tuple[list[Pair], list[BadRow]]:
    """Rows of a .jsonl or .parquet table of pairs (see PAIR_FIELDS), in order, and the bad ones."""
    pairs, bad, base = [], [], path.parent
    if pairs_format(path) == "jsonl":
        rows = _json_lines(path)
    else:
        pa = _pyarrow()
        try:
            rows = enumerate(pa.parquet.read_table(path).to_pylist(), 1)
        except (OSError, pa.ArrowException) as e:
            raise InputError(f"{path}: cannot read as parquet ({e})") from None
    for n, obj in rows:
        if isinstance(obj, str):
            bad.append(BadRow(f"{path}:{n}", obj, n))
            continue
        try:
            pairs.append(_pair(obj, n, base))
        except ValueError as e:
            bad.append(BadRow(f"{path}:{n}", str(e), n))
    return pairs, bad


def write_scores(path: Path, rows: list[dict]) -> None:
    """Rows {"row", "id", "score", "error"}, and "pages" (a PDF document's best pages) where a row has them, to
    .jsonl (a null id, error or pages left out; a failed row's score is null) or .parquet (with a "pages" column,
    JSON text, when any row has pages), atomically: the file appears whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    if pairs_format(path) == "jsonl":
        text = "".join(json.dumps({k: v for k, v in r.items() if v is not None or k == "score"}, ensure_ascii=False) + "\n"
                       for r in rows)
        tmp.write_text(text, encoding="utf-8")
    else:
        pa = _pyarrow()
        ids = [r["id"] for r in rows]
        # One type per column: integer ids stay integers unless strings are mixed in.
        id_type = pa.int64() if all(i is None or isinstance(i, int) for i in ids) else pa.string()
        columns = {
            "row": pa.array([r["row"] for r in rows], pa.int64()),
            "id": pa.array([i if i is None or id_type == pa.int64() else str(i) for i in ids], id_type),
            "score": pa.array([r["score"] for r in rows], pa.float64()),
            "error": pa.array([r["error"] for r in rows], pa.string()),
        }
        if any(r.get("pages") is not None for r in rows):
            # A list of {page, relevance_score} as JSON text: a struct column would tie readers to its shape.
            columns["pages"] = pa.array([None if r.get("pages") is None else json.dumps(r["pages"]) for r in rows],
                                        pa.string())
        pa.parquet.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
