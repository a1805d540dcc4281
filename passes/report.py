"""What the attention pass did to one graph, site by site."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SiteReport:
    index: int
    name: str
    status: str  # "rewritten" | "skipped" | "disabled"
    reason: str = ""


@dataclass
class PassReport:
    """What the pass did to one graph: one entry per attention site, in execution order."""

    sites: list[SiteReport] = field(default_factory=list)

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
        lines = [f"{self.matched} attention sites, {self.rewritten} rewritten"]
        lines += [f"  site {s.index} ({s.name}): {s.status} {s.reason}".rstrip() for s in self.sites if s.status != "rewritten"]
        return "\n".join(lines)
