"""Footprints of published GGUFs before download, from their remote headers (glmlocal.models.remote), and the
smaller quants the planner's no-fit hint may name (converted ones from the recipe, published ones from headers).
No printing."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import PurePosixPath

from glmlocal.errors import GlmlocalError, InputError, PlanError
from glmlocal.models.hub import HubClient, RepoListing, offline
from glmlocal.models.pull import select_gguf
from glmlocal.models.registry import QUANTS, ModelSpec, check_quant
from glmlocal.models.remote import (
    RemoteHeaders,
    cached_total_bytes,
    drop_headers,
    fetch_headers,
)
from glmlocal.models.store import Store
from glmlocal.plan.footprint import (
    Footprint,
    footprint_from_headers,
    footprint_from_spec,
)
from glmlocal.plan.view import gib


def published_footprint(spec: ModelSpec, quant: str, *, revision: str | None = None, store: Store | None = None,
                        client: HubClient | None = None) -> tuple[Footprint, RemoteHeaders]:
    """Footprint of `spec`'s published `quant` GGUF from its headers (cached, else fetched with Range requests).

    Raises InputError (no such published quant, unreadable header), HubError (offline without cache, hub
    errors, a hub that ignores Range requests).
    """
    quant = check_quant(spec, quant)
    published = spec.published_gguf(quant)
    if published is None:
        raise InputError(f"{spec.name} has no published {quant} GGUF to read headers from")
    headers = fetch_headers(published.repo, published.pattern, revision=revision, store=store, client=client,
                            what=f"{spec.name} {quant}")
    try:
        fp = footprint_from_headers(headers.headers, PurePosixPath(headers.repo, headers.files[0][0]))
    except InputError as e:
        drop_headers(published.repo, published.pattern, revision=revision, store=store)
        raise InputError(f"the published {quant} GGUF of {spec.name} ({published.repo}) has an unusable header: "
                         f"{e.message}") from e
    return replace(fp, quant=quant), headers


class SmallerQuants(Mapping):
    """quant -> Footprint of the quants smaller than the planned one, best (largest) that could fit first.

    Lazy: nothing is listed or fetched unless the planner iterates it (only when nothing fits), and it stops
    at the first one that fits, so at most the headers it needs are fetched. Converted quants are sized from
    the recipe; published-only ones from their headers (cached, else fetched), ordered by the hub's file sizes.
    Published quants that could not be sized (offline without cache, hub errors) are kept in `unsized` so the
    error can say so instead of claiming nothing smaller exists.
    """

    def __init__(self, spec: ModelSpec, current_bytes: int, limit_bytes: int | None = None, *,
                 revision: str | None = None, store: Store | None = None,
                 client_factory: Callable[[], HubClient] | None = None):
        self.spec, self.current_bytes, self.limit_bytes = spec, current_bytes, limit_bytes
        self.revision, self.store = revision, store or Store()
        self.client_factory = client_factory or HubClient
        self.loaded: dict[str, Footprint] = {}
        self.sizes: dict[str, int] = {}
        self.published: set[str] = set()
        self.unsized: dict[str, str] = {}  # quant -> why it could not be sized
        self._order: list[str] | None = None

    def __iter__(self) -> Iterator[str]:
        for quant in self._candidates():
            if quant in self.loaded or self._load(quant):
                yield quant

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        return True  # `alternatives or {}` must not size every candidate (Mapping's truth test is len())

    def __getitem__(self, quant: str) -> Footprint:
        if quant not in self.loaded and not self._load(quant):
            raise KeyError(quant)
        return self.loaded[quant]

    # -- sizing ----------------------------------------------------------------------------
    def _candidates(self) -> list[str]:
        if self._order is None:
            for q in QUANTS:
                fp = footprint_from_spec(self.spec, q)
                self.loaded[q], self.sizes[q] = fp, fp.file_bytes
            self._size_published()
            limit = None if self.limit_bytes is None else self.limit_bytes * 1.05  # MTP/header slack
            fits = [q for q, n in self.sizes.items() if n < self.current_bytes and (limit is None or n <= limit)]
            self._order = sorted(fits, key=lambda q: -self.sizes[q])
        return self._order

    def _size_published(self) -> None:
        """File sizes of the published-only quants: from cached header sets, else one hub listing per repo."""
        listings: dict[str, RepoListing | str] = {}  # repo -> its listing, or the error message listing it gave
        for q in self.spec.published_only():
            self.published.add(q)
            g = self.spec.gguf[q]
            cached = cached_total_bytes(g.repo, g.pattern, revision=self.revision, store=self.store)
            if cached is not None:
                self.sizes[q] = cached
                continue
            if g.repo not in listings:
                listings[g.repo] = self._listing(g.repo)
            listing = listings[g.repo]
            if isinstance(listing, str):
                self.unsized[q] = listing
                continue
            try:
                self.sizes[q] = sum(f.size for f in select_gguf(listing, g.pattern))
            except GlmlocalError as e:
                self.unsized[q] = e.message

    def _listing(self, repo: str) -> RepoListing | str:
        if offline():
            return "HF_HUB_OFFLINE is set and its headers are not cached"
        try:
            return self.client_factory().listing(repo, self.revision)
        except GlmlocalError as e:
            return e.message

    def _load(self, quant: str) -> bool:
        try:
            fp, _ = published_footprint(self.spec, quant, revision=self.revision, store=self.store,
                                        client=self.client_factory())
        except GlmlocalError as e:
            self.unsized[quant] = e.message
            return False
        self.loaded[quant] = fp
        return True

    # -- the error -------------------------------------------------------------------------
    def explain(self, err: PlanError) -> PlanError:
        """Make the planner's no-fit hint say how to get a published quant, or which ones were not sized."""
        hint = err.hint or ""
        named = next((q for q in self.published if f"--quant {q} " in hint + " "), None)
        if named is not None:
            err.hint = (f"--quant {named} fits: a published GGUF of {gib(self.sizes.get(named, 0))}; "
                        f"run: glmlocal pull {self.spec.name} --quant {named}")
        elif "--quant" not in hint and "--ctx" not in hint and self.unsized and self._order is not None:
            names = [q for q in self.spec.published_only() if q in self.unsized]
            err.hint = (f"no converted or already-sized quant fits; the published GGUFs {', '.join(names)} could "
                        f"not be sized (offline, or the hub is unreachable): size one with "
                        f"`glmlocal plan {self.spec.name} --quant QUANT` when online")
        return err
