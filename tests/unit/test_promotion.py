"""Champion moves only on evidence: gate passed and not worse on the same test set, or forced with a reason."""

import pytest

from pipeline.stages.push import Candidate, PushOptions, decide_promotion

CAND = Candidate(None, "macro_f1", 0.90, "fp-a")


@pytest.mark.parametrize(
    ("passed", "champion", "options", "promote", "why"),
    [
        (True, None, PushOptions(), True, "no champion yet"),
        (False, None, PushOptions(), False, "gate failed"),
        (True, Candidate("3", "macro_f1", 0.90, "fp-a"), PushOptions(), True, ">= champion v3"),
        (True, Candidate("3", "macro_f1", 0.91, "fp-a"), PushOptions(), False, "worse than champion v3"),
        (True, Candidate("3", "macro_f1", 0.10, "fp-b"), PushOptions(), False, "another test set"),
        (True, Candidate("3", "accuracy", 0.10, "fp-a"), PushOptions(), False, "gated on accuracy"),
        (False, Candidate("3", "macro_f1", 0.99, "fp-a"), PushOptions(force=True, reason="hotfix"), True, "forced: hotfix"),
    ],
)
def test_decide_promotion(passed, champion, options, promote, why):
    got, reason = decide_promotion(passed, CAND, champion, options)
    assert got is promote
    assert why in reason
