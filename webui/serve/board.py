"""The job board: a small Ray actor between the ingress and the replicas. A replica running a part posts its progress
there every few tenths of a second and reads back whether the ingress asked to interrupt or skip it; the ingress
reads the reports for /progress. (A replica busy with a part takes no other request, so these go around it.)"""
from __future__ import annotations

from webui.serve.parts import ProgressReport


class JobBoard:
    def __init__(self) -> None:
        self.reports: dict[str, ProgressReport] = {}
        self.asked: dict[str, tuple[bool, bool]] = {}  # part id -> (interrupt, skip)

    def post(self, part_id: str, report: ProgressReport | None) -> tuple[bool, bool]:
        """Keep ``report`` (None: the part starts); what was asked for the part since (a Skip is told once)."""
        if report is not None:
            self.reports[part_id] = report
        interrupt, skip = self.asked.get(part_id, (False, False))
        if skip:
            self.asked[part_id] = (interrupt, False)
        return interrupt, skip

    def ask(self, part_ids: list[str], interrupt: bool, skip: bool) -> None:
        for part_id in part_ids:
            was = self.asked.get(part_id, (False, False))
            self.asked[part_id] = (was[0] or interrupt, was[1] or skip)

    def read(self, part_ids: list[str]) -> dict[str, ProgressReport]:
        return {part_id: self.reports[part_id] for part_id in part_ids if part_id in self.reports}

    def forget(self, part_ids: list[str]) -> None:
        for part_id in part_ids:
            self.reports.pop(part_id, None)
            self.asked.pop(part_id, None)
