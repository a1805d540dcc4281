"""The README's quick start is examples/quickstart.py, and it runs as it stands."""
import re
import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "quickstart.py"


def test_readme_quick_start_is_the_example_file():
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert EXAMPLE.read_text() in blocks, "the README's quick start block must be examples/quickstart.py verbatim"


def test_example_runs_unchanged_and_compresses_the_prompt(tokenizer, capsys):
    # ``tokenizer``: the embedded model is exported once per machine before this runs
    namespace = runpy.run_path(str(EXAMPLE), run_name="__main__")
    printed = capsys.readouterr().out
    assert "30 attention sites, 30 rewritten" in printed
    assert "answer: The pass key is 71432" in printed, printed
    report = namespace["cache"].memory_report()
    device = namespace["device"]
    assert report["uncompressed"]["prompts"] == 0, "the quick start's prompt is long enough to compress"
    values = report.get("cpu", {}).get("offloaded_V", 0) + report[device].get("device_V", 0)
    assert report[device]["U"] > 0 and values > 0
    assert "gpu" not in report
