"""Built-in LM data: the multi-modal arithmetic task and the real-text corpus."""

import collections
import re

from kdforge.data import arithmetic
from kdforge.data.lm import builtin_records

LINE = re.compile(r"^(\d+) ([+\-*]) (\d+) = (-?\d+)$")


def test_every_listed_solution_is_correct_and_there_are_several():
    problems = arithmetic.generate(300, seed=0)
    # only problems whose numbers all coincide (e.g. 2 rows of 2, 2 boxes) have a single solution
    assert sum(len(p.solutions) >= 2 for p in problems) > 0.9 * len(problems)
    for problem in problems:
        assert problem.solution in problem.solutions
        assert 0 <= problem.answer < 50
        for solution in problem.solutions:
            *steps, final = solution.split("\n")
            for step in steps:
                a, op, b, result = LINE.match(step).groups()
                assert arithmetic.OPERATIONS[op](int(a), int(b)) == int(result)
            assert final == f"#### {problem.answer}" and arithmetic.extract_answer(solution) == problem.answer
            numbers_in_question = set(re.findall(r"\d+", problem.question))
            first_operands = LINE.match(steps[0]).group(1, 3)
            assert set(first_operands) <= numbers_in_question  # the first step uses the problem's numbers


def test_training_solutions_are_spread_over_the_valid_orders():
    firsts = collections.Counter()
    for problem in arithmetic.generate(3000, seed=1):
        if "in all" in problem.question and len(problem.solutions) == 6:
            firsts[problem.solutions.index(problem.solution)] += 1
    assert len(firsts) == 6 and min(firsts.values()) > 0.6 * max(firsts.values())


def test_generation_is_deterministic_per_seed():
    assert arithmetic.generate(20, seed=5) == arithmetic.generate(20, seed=5) != arithmetic.generate(20, seed=6)


def test_builtin_corpus_is_real_text_with_a_disjoint_heldout_part():
    train, heldout = builtin_records("web-text"), builtin_records("web-text-heldout")
    assert len(train) > 5000 and len(heldout) > 500
    assert not {r["text"] for r in train[-50:]} & {r["text"] for r in heldout}
    assert train[0]["text"].startswith("In the beginning God created the heavens and the earth.")


def test_test_questions_never_occur_in_training():
    train, test = builtin_records("arithmetic"), builtin_records("arithmetic-test")
    assert len(train) == 20_000 and len(test) == 500
    assert not {r["query"] for r in train} & {r["query"] for r in test}
