"""`m0lite explain`: why one document scores as it does for a query, as numbers (--json) or a picture (--out)."""

from __future__ import annotations

import json

from .options import add_model_arguments, document_arg, load_reranker
from .errors import M0liteError
from .explain import METHODS


def add_explain_command(sub) -> None:
    p = sub.add_parser("explain", help="attributions of a document's score over its text tokens and image regions")
    add_model_arguments(p)
    p.add_argument("--query", help="the query text")
    p.add_argument("--query-image", help="an image query: file, URL, base64 or data URI")
    p.add_argument("--text", help="text that goes with an image DOC: the document is then the image and this text")
    p.add_argument("--method", choices=METHODS, default="occlusion",
                   help="occlusion: the score lost when each part is removed (one pass per part); attention: "
                        "the score token's attention on each part (one pass); contribution: the derivative of the "
                        "score with respect to that attention (one pass and a backward of the score token; not "
                        "with --quantize) (default: occlusion)")
    p.add_argument("--json", action="store_true", help="print the whole explanation as JSON")
    p.add_argument("--out", help="write a picture of it (PNG): a heatmap over the page, highlighted text")
    p.add_argument("--top", type=int, default=10, help="without --json: print the N strongest tokens and regions")
    p.add_argument("--page", type=int, help="with a .pdf DOC: explain this page (1-based), rendered as ranking "
                                            "renders it, as an image document")
    p.add_argument("--pdf-text", action="store_true", help="with --page: the page's image and its extracted text")
    p.add_argument("document", metavar="DOC", help="text, a text file, an image file or URL, a .pdf file (with --page)")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args) -> None:
    if (args.query is None) == (args.query_image is None):
        raise M0liteError("give exactly one of --query TEXT or --query-image PATH_OR_URL")
    doc = document_arg(args.document)
    if args.text is not None:
        if "image" not in doc:
            raise M0liteError("--text goes with an image DOC (a document of an image and its text)")
        doc = {"image": doc["image"], "text": args.text}
    if ("pdf" in doc) != (args.page is not None):
        raise M0liteError("a .pdf DOC is explained one page at a time: give --page N" if "pdf" in doc
                          else "--page goes with a .pdf DOC")
    if args.pdf_text and "pdf" not in doc:
        raise M0liteError("--pdf-text goes with a .pdf DOC and --page")
    if "pdf" in doc and args.text is not None:
        raise M0liteError("--text does not go with a PDF page (--pdf-text adds the page's own text)")
    query = {"image": args.query_image} if args.query_image else args.query
    rr = load_reranker(args)
    if "pdf" in doc:
        doc = _pdf_page(rr, doc["pdf"], args.page, args.pdf_text)
    out = rr.explain(query, doc, method=args.method)
    if args.out:
        from .explain_render import render
        from .images import load_image

        image = load_image(doc["image"]) if "image" in doc else None
        label = args.query if args.query is not None else f"[image] {args.query_image}"
        render(out, label, image=image, text=doc.get("text")).image.save(args.out, format="PNG")
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return
    print(f"score {out['score']:.4f} (raw {out['raw_score']:.4f}), method {out['method']}")
    strongest = sorted(out["text"], key=lambda t: -abs(t["score"]))[: args.top]
    if strongest:
        print(f"{'score':>9}  {'chars':>11}  token")
        for t in strongest:
            print(f"{t['score']:9.4f}  {t['start']:>5}-{t['end']:<5}  {t['token']!r}")
    if out["image"] is not None:
        print(f"{'score':>9}  {'row':>3} {'col':>3}  box (x0, y0, x1, y1) in the original image")
        for r in sorted(out["image"]["regions"], key=lambda r: -abs(r["score"]))[: args.top]:
            print(f"{r['score']:9.4f}  {r['row']:>3} {r['col']:>3}  ({', '.join(f'{v:.1f}' for v in r['box'])})")
    if args.out:
        print(f"wrote {args.out}")


def _pdf_page(rr, src: str, number: int, with_text: bool) -> dict:
    """Page `number` of a PDF as the document a ranking scored for it: the image of its rendered pixels (and,
    with_text, its extracted text)."""
    from .pdf import render_page

    page = render_page(src, number, max_bytes=rr.max_pdf_bytes, min_pixels=rr.min_pixels, max_pixels=rr.max_pixels,
                       with_text=with_text)
    return {"image": page.image, "text": page.text} if with_text else {"image": page.image}
