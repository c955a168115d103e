"""What each HTTP route accepts, as data: the request fields per route, the names the served model
answers to, and the small pure checks the route handlers share (`app`).

Accepted fields are one table (`ROUTE_FIELDS`): the API's own (OpenAI's for /v1/embeddings, TEI's for
/embed and /tokenize, ModelScope's for /similarity) plus our documented extensions. Anything else is a
400 naming it, as OpenAI answers it: a misspelt `dimension` must not return full-width vectors silently.
"""

from __future__ import annotations

from typing import Any

from corom_runtime.serving.http_errors import HTTPError

# our extensions, the same on every embedding route (README: output shaping, chunking, prompts)
EXTENSIONS = frozenset({"precision", "truncate", "truncation_direction", "prompt_name", "input_type", "chunking"})

ROUTE_FIELDS: dict[str, frozenset[str]] = {
    # OpenAI's embeddings API: https://platform.openai.com/docs/api-reference/embeddings/create
    "/v1/embeddings": frozenset({"input", "model", "encoding_format", "dimensions", "user"}) | EXTENSIONS,
    # TEI's /embed (inputs, normalize, truncate, truncation_direction, prompt_name, dimensions)
    "/embed": frozenset({"inputs", "normalize", "dimensions"}) | EXTENSIONS,
    # TEI's /tokenize
    "/tokenize": frozenset({"inputs", "add_special_tokens", "prompt_name"}),
    # ModelScope's pipeline input, and whether to return the vectors with the scores
    "/similarity": frozenset({"source_sentence", "sentences_to_compare", "return_embeddings"}),
}

# completes "'input' holds ...": a list of integers (or of such lists) is token ids, never text
LANGCHAIN_TOKENS = ("token ids (arrays of integers): this server embeds text, send strings. LangChain's "
                    "OpenAIEmbeddings sends token ids by default: set check_embedding_ctx_length=False.")


def check_fields(route: str, body: dict) -> None:
    """A 400 for the first field `route` does not define (OpenAI's wording, then what is accepted)."""
    accepted = ROUTE_FIELDS[route]
    unknown = [k for k in body if k not in accepted]
    if unknown:
        name = str(unknown[0])[:60]
        raise HTTPError(400, f"Unrecognized request argument supplied: {name} (accepted on {route}: "
                             f"{', '.join(sorted(accepted))})")


def is_token_ids(value: Any) -> bool:
    """`input` as OpenAI's token arrays: a list of ints, or a list of lists of ints."""
    def ints(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    return ints(value) or (isinstance(value, list) and bool(value) and all(ints(v) for v in value))


def model_names(name: str, source: str, preset: str | None) -> tuple[str, ...]:
    """The names a request's `model` may give for the served model: its name, its preset and its source
    (with and without the scheme, e.g. `modelscope:damo/x` and `damo/x`)."""
    names = [name, preset or "", source, source.partition(":")[2]]
    return tuple(dict.fromkeys(n for n in names if n))


def served_model(requested: Any, names: tuple[str, ...]) -> str:
    """The model name to answer with: the served name when `requested` is absent; `requested` when it
    names the served model (case-insensitive; a hub id like `sentence-transformers/all-MiniLM-L6-v2`
    whose last part is the name counts); else a 404 in OpenAI's shape naming what is served."""
    if requested is None:
        return names[0]
    if not isinstance(requested, str):
        raise HTTPError(400, f"'model' must be a string, got {type(requested).__name__}")
    wanted = requested.strip().lower()
    known = {n.lower() for n in names}
    if wanted in known or wanted.rsplit("/", 1)[-1] in known:
        return requested
    raise HTTPError(404, f"The model '{requested[:100]}' does not exist on this server: it serves "
                         f"'{names[0]}' (also answers to {', '.join(repr(n) for n in names[1:]) or 'no other name'}); "
                         "see GET /v1/models", "invalid_request_error")
