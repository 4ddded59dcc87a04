"""Command line: `m0lite rank`, `m0lite demo`, `m0lite serve`, `m0lite quantize`, `m0lite explain`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import M0liteError
from .options import add_model_arguments, document_arg, json_document, jsonl_documents, load_reranker


# The seed example: a query against texts in several languages (from the jina-reranker-m0 model card).
DEMO_QUERY = "small language model data extraction"
DEMO_DOCUMENTS = [
    "We present ReaderLM-v2, a compact 1.5 billion parameter language model designed for efficient web content "
    "extraction. Our model processes documents up to 512K tokens, transforming messy HTML into clean Markdown or "
    "JSON formats with high accuracy -- making it an ideal tool for grounding large language models.",
    "数据提取么？为什么不用正则啊，你用正则不就全解决了么？",
    "During the California Gold Rush, some merchants made more money selling supplies to miners than the miners "
    "made finding gold.",
    "Die wichtigsten Beiträge unserer Arbeit sind zweifach: Erstens führen wir eine neuartige dreistufige "
    "Datensynthese-Pipeline namens Draft-Refine-Critique ein, die durch iterative Verfeinerung hochwertige "
    "Trainingsdaten generiert.",
]


def print_ranking(results: list[dict], documents: list, as_json: bool, query=None) -> None:
    if as_json:
        print(json.dumps({**({"query": query} if query is not None else {}), "results": results},
                         ensure_ascii=False, indent=2))
        return
    print(f"{'rank':>4}  {'score':>8}  {'doc':>4}  document")
    for rank, r in enumerate(results, 1):
        d = documents[r["index"]]
        text = " + ".join(([f"[pdf] {d['pdf']}"] if "pdf" in d else []) + ([f"[image] {d['image']}"] if "image" in d else [])
                          + ([d["text"]] if "text" in d else []))
        if "pages" in r:
            text = "pages " + ", ".join(f"{p['page']} ({p['relevance_score']:.4f})" for p in r["pages"]) + "  " + text
        text = " ".join(text.split())
        print(f"{rank:>4}  {r['relevance_score']:8.4f}  {r['index']:>4}  {text[:80] + ('…' if len(text) > 80 else '')}")


def rank_documents(args) -> list[dict]:
    """`rank`'s documents, in the order their indices count: the DOC arguments, each --doc-json, then the
    lines of --docs-jsonl."""
    documents = [document_arg(d) for d in args.documents]
    for k, text in enumerate(args.doc_json, 1):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise M0liteError(f"--doc-json {k}: not JSON ({e.msg} at column {e.colno})") from None
        documents.append(json_document(value, f"--doc-json {k}"))
    if args.docs_jsonl is not None:
        documents += jsonl_documents(args.docs_jsonl)
    return documents


def cmd_rank(args) -> None:
    if (args.query is None) == (args.query_image is None):
        raise M0liteError("give exactly one of --query TEXT or --query-image PATH_OR_URL")
    documents = rank_documents(args)
    if not documents:
        raise M0liteError("give at least one document")
    query = {"image": args.query_image} if args.query_image else args.query
    rr = load_reranker(args)
    results = rr.rank(query, documents, top_n=args.top_n, show_progress=len(documents) > 32 and not args.json,
                      pdf_text=args.pdf_text, max_chunks_per_doc=args.max_chunks_per_doc)
    print_ranking(results, documents, args.json)


def cmd_demo(args) -> None:
    model = args.model
    if model is None:
        from m0lite.fixtures.random_checkpoint import write_random_checkpoint

        model = Path(args.cache).expanduser() / "demo-tiny"
        if not (model / "model.safetensors").exists():
            write_random_checkpoint(model, seed=0)
        print(f"Demo checkpoint: {model}\nNOTE: random weights in the published layout (no hub access here); the scores "
              "below exercise the whole pipeline but mean nothing. Pass --model jinaai/jina-reranker-m0 for real ones.\n",
              file=sys.stderr)
    args.model = model
    rr = load_reranker(args)
    documents = [{"text": d} for d in DEMO_DOCUMENTS]
    if not args.json:  # --json prints one JSON document and nothing else
        print(f"query: {DEMO_QUERY}")
    print_ranking(rr.rank(DEMO_QUERY, documents), documents, args.json, query=DEMO_QUERY)


def cmd_quantize(args) -> None:
    from .weights.quantized import save_quantized

    out = save_quantized(args.src, args.dst)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 2**20:.1f} MiB of weights)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m0lite", description="jina-reranker-m0 reranking, without transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rank", help="rank documents (texts, text files, image files or URLs) for a query")
    add_model_arguments(p)
    p.add_argument("--query", help="the query text")
    p.add_argument("--query-image", help="an image query: file, URL, base64 or data URI")
    p.add_argument("--top-n", type=int, default=None, help="print only the best N")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--pdf-text", action="store_true", help="score each page of a PDF with its extracted text")
    p.add_argument("--max-chunks-per-doc", type=int, default=None, metavar="K",
                   help="score a text longer than the model reads as up to K windows; its best window counts")
    p.add_argument("--doc-json", action="append", default=[], metavar="JSON",
                   help='a document as JSON, e.g. \'{"image": "page.png", "text": "its caption"}\' (an image and its '
                        'text together), \'{"text": "..."}\' or a JSON string; repeatable')
    p.add_argument("--docs-jsonl", metavar="FILE",
                   help="documents as JSON lines, one a line as in --doc-json ('-': standard input; image paths "
                        "from the file's folder)")
    p.add_argument("documents", nargs="*", metavar="DOC",
                   help="text, a text file, an image file or URL, a .pdf file; documents are numbered in the order DOCs, "
                        "--doc-json, --docs-jsonl")
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("demo", help="rank the seed example (on a local random checkpoint unless --model is given)")
    add_model_arguments(p, required=False)
    p.add_argument("--cache", default="~/.cache/m0lite", help="where the demo checkpoint is written")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("quantize", help="write an int8 checkpoint (half the bytes) of a checkpoint folder or hub id")
    p.add_argument("src", help="checkpoint folder or hub repo id")
    p.add_argument("dst", help="new folder for the int8 checkpoint")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("serve", help="serve the Jina-compatible /v1/rerank HTTP API")
    try:
        from .server import add_serve_arguments, serve
    except ImportError as e:  # the optional `serve` extra is missing
        p.set_defaults(func=lambda a, e=e: (_ for _ in ()).throw(M0liteError(f"m0lite serve needs `pip install m0lite[serve]` ({e})")))
    else:
        add_serve_arguments(p)
        p.set_defaults(func=serve)

    from .offline.cli import add_offline_commands  # `m0lite eval`, `m0lite batch`
    add_offline_commands(sub)
    from .explain_cli import add_explain_command  # `m0lite explain`
    add_explain_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except M0liteError as e:
        print(f"m0lite: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
