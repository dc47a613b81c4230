"""Sample-level parallel scaling: N answers per prompt, then vote, pick, or stop early.

The pure parts live here (no model needed): records and their JSONL file (``records``), answer
extraction (``answers``), aggregators such as majority vote and best-of-N (``aggregators``),
exact pass@k / maj@k / bon@k estimators with confidence intervals (``estimators``), early-stopping
policies (``policies``), scorers for best-of-N (``scorers``) and offline tasks with exact
verifiers (``tasks``).
"""

from .aggregators import (STRATEGIES, Decision, best_of_majority, best_of_n, first_finished, get_strategy,
                          majority_vote, shortest, verify_then_vote, weighted_vote)
from .answers import INVALID, Invalid, canonical_answer, canonical_number, extract_answers, get_extractor
from .estimators import (Interval, ScoreReport, bon_at_k, bootstrap_ci, maj_at_k, pass_at_k, score_sample_set,
                         wilson_ci)
from .policies import CONTINUE, STOP, Action, AgreeFirstW, FirstFinish, NoStop, Policy, PosteriorSettled, make_policy
from .records import CostLedger, Problem, Sample, SampleSet
from .scorers import SCORERS, make_scorer, score_samples
from .tasks import TASKS, Task, get_task, load_problems, write_training_corpus

__all__ = [
    "STRATEGIES", "Decision", "best_of_majority", "best_of_n", "first_finished", "get_strategy",
    "majority_vote", "shortest", "verify_then_vote", "weighted_vote",
    "INVALID", "Invalid", "canonical_answer", "canonical_number", "extract_answers", "get_extractor",
    "Interval", "ScoreReport", "bon_at_k", "bootstrap_ci", "maj_at_k", "pass_at_k", "score_sample_set",
    "wilson_ci",
    "CONTINUE", "STOP", "Action", "AgreeFirstW", "FirstFinish", "NoStop", "Policy", "PosteriorSettled",
    "make_policy",
    "CostLedger", "Problem", "Sample", "SampleSet",
    "SCORERS", "make_scorer", "score_samples",
    "TASKS", "Task", "get_task", "load_problems", "write_training_corpus",
]
