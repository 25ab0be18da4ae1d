"""The result matrix as text, JSON, JUnit XML (for CI systems) and Markdown (for job summaries)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence

from conformance.runner import Result


def counts(results: Sequence[Result]) -> Counter[str]:
    return Counter(r.status for r in results)


def as_text(results: Sequence[Result]) -> str:
    lines = [f"{'case':<38} {'backend':<10} {'dtype':<9} {'status':<5} detail"]
    lines += [f"{r.case:<38} {r.backend:<10} {r.dtype:<9} {r.status:<5} {r.detail}" for r in results]
    c = counts(results)
    lines.append(f"\n{c['pass']} passed, {c['fail']} failed, {c['skip']} skipped")
    return "\n".join(lines)


def as_json(results: Sequence[Result]) -> str:
    return json.dumps({"results": [r.as_dict() for r in results], "failed": counts(results)["fail"]},
                      indent=2)


def as_junit(results: Sequence[Result]) -> str:
    """One testsuite; a testcase per cell, classname `backend.dtype`, name the case."""
    c = counts(results)
    suite = ET.Element("testsuite", name="gemma-conformance", tests=str(len(results)),
                       failures=str(c["fail"]), skipped=str(c["skip"]), errors="0")
    for r in results:
        case = ET.SubElement(suite, "testcase", classname=f"{r.backend}.{r.dtype}", name=r.case)
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.detail).text = r.detail
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.detail)
        else:
            ET.SubElement(case, "system-out").text = r.detail
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)


def as_markdown(results: Sequence[Result]) -> str:
    """A case x (backend, dtype) matrix; failures and skips listed with their details."""
    columns = list(dict.fromkeys((r.backend, r.dtype) for r in results))
    cases = list(dict.fromkeys(r.case for r in results))
    cell = {(r.case, r.backend, r.dtype): r for r in results}
    mark = {"pass": "pass", "fail": "**FAIL**", "skip": "skip"}
    lines = ["| case | " + " | ".join(f"{b} {d}" for b, d in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for case in cases:
        row = [mark[cell[(case, b, d)].status] if (case, b, d) in cell else "" for b, d in columns]
        lines.append(f"| {case} | " + " | ".join(row) + " |")
    notes = [f"- {r.status} `{r.case}` on {r.backend} {r.dtype}: {r.detail}"
             for r in results if r.status != "pass"]
    c = counts(results)
    return "\n".join(["## Gemma conformance", "", f"{c['pass']} passed, {c['fail']} failed, "
                      f"{c['skip']} skipped", "", *lines, "", *notes]) + "\n"
