"""What a pass did to one graph: one entry per site it matched. Both passes report so (the attention
pass, ``attention_pass.py``; the token-chunk pass, ``token_chunks.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SiteReport:
    """One place a pass matched: an attention site, or a token-wise region."""

    name: str
    status: str  # "rewritten"; left as it was: "skipped" (see reason), "disabled", "short"
    reason: str = ""
    index: int | None = None  # an attention site's position in execution order


@dataclass
class PassReport:
    """What one pass did to one graph: its sites in the pass's order, and their summary.

    ``subject`` names the sites and ``done`` the rewrite in the summary line; the defaults are the
    attention pass's words, the token-chunk pass says "token-wise regions, ... chunked".
    """

    sites: list[SiteReport] = field(default_factory=list)
    subject: str = "attention sites"
    done: str = "rewritten"

    @property
    def matched(self) -> int:
        return len(self.sites)

    @property
    def rewritten(self) -> int:
        return sum(s.status == "rewritten" for s in self.sites)

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "skipped"]

    def __str__(self) -> str:
        lines = [f"{self.matched} {self.subject}, {self.rewritten} {self.done}"]
        lines += [f"  {_label(s)}: {s.status} {s.reason}".rstrip() for s in self.sites if s.status != "rewritten"]
        return "\n".join(lines)


def _label(site: SiteReport) -> str:
    return site.name if site.index is None else f"site {site.index} ({site.name})"
