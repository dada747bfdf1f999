"""A reasoning task in GSM8K's format whose correct solutions are genuinely multi-modal.

Each problem is a short word problem; a solution is a few ``a op b = c`` lines and a final
``#### answer`` line. Every problem has several equally valid solutions (the terms of a sum or a
product in any order; two gifts subtracted one by one in either order, or added first), listed in
:attr:`Problem.solutions`, and the training solution is drawn uniformly among them, so a teacher's
next-token distribution at the first step is multi-modal by construction: the situation RLKD's
ranking term is for. Numbers stay small (every result below 50) so models of a few million
parameters learn the task in minutes on a CPU.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
from dataclasses import dataclass

NAMES = ("Ana", "Ben", "Cara", "Dan", "Eva", "Finn", "Gia", "Hugo", "Ivy", "Jon", "Kim", "Leo", "Mia", "Noah")
ITEMS = ("apples", "marbles", "books", "stickers", "pencils", "shells", "cards", "stamps", "coins", "beads")
COLOURS = ("red", "blue", "green", "yellow", "white")
ANSWER = re.compile(r"####\s*(-?\d+)")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the one drawn for training
    solutions: tuple[str, ...]  # every valid solution
    answer: int


def write_solution(first: tuple[int, str, int], then: tuple[str, int] | tuple[int, str]) -> str:
    """Two lines ``a op b = r`` and ``r op c = s`` (or ``c op r = s``), then ``#### s``."""
    a, op, b = first
    result = OPERATIONS[op](a, b)
    if isinstance(then[0], str):  # (op, c): previous result on the left
        second = (result, then[0], then[1])
    else:  # (c, op): previous result on the right
        second = (then[0], then[1], result)
    final = OPERATIONS[second[1]](second[0], second[2])
    return f"{a} {op} {b} = {result}\n{second[0]} {second[1]} {second[2]} = {final}\n#### {final}"


def _sum_of_three(rng: random.Random) -> tuple[str, list[str]]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    colours = rng.sample(COLOURS, 3)
    counts = [rng.randint(1, 9) for _ in colours]
    listed = ", ".join(f"{n} {c} {item}" for n, c in zip(counts[:-1], colours[:-1]))
    question = f"{name} has {listed} and {counts[-1]} {colours[-1]} {item}. How many {item} does {name} have in all?"
    orders = [write_solution((a, "+", b), ("+", c)) for a, b, c in itertools.permutations(counts)]
    return question, orders


def _two_gifts(rng: random.Random) -> tuple[str, list[str]]:
    giver, first, second = rng.sample(NAMES, 3)
    item = rng.choice(ITEMS)
    give = [rng.randint(1, 6), rng.randint(1, 6)]
    start = sum(give) + rng.randint(1, 9)
    question = (f"{giver} had {start} {item}. {giver} gave {give[0]} to {first} and {give[1]} to {second}. "
                f"How many {item} does {giver} have left?")
    one_by_one = [write_solution((start, "-", a), ("-", b)) for a, b in (give, give[::-1])]
    added_first = [write_solution((a, "+", b), (start, "-")) for a, b in (give, give[::-1])]
    return question, one_by_one + added_first


def _boxes(rng: random.Random) -> tuple[str, list[str]]:
    item = rng.choice(ITEMS)
    rows, per_row, boxes = rng.randint(2, 4), rng.randint(2, 4), rng.randint(2, 3)
    question = f"A box holds {rows} rows of {per_row} {item}. How many {item} are in {boxes} boxes?"
    orders = [write_solution((a, "*", b), ("*", c)) for a, b, c in itertools.permutations((rows, per_row, boxes))]
    return question, orders


KINDS = (_sum_of_three, _two_gifts, _boxes)


def generate(n: int, seed: int) -> list[Problem]:
    """``n`` problems, deterministic for ``seed``; each training solution drawn among the valid ones."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        question, solutions = rng.choice(KINDS)(rng)
        distinct = tuple(dict.fromkeys(solutions))
        problems.append(Problem(question, rng.choice(distinct), distinct, extract_answer(distinct[0])))
    return problems


def is_test_question(question: str) -> bool:
    """A fixed tenth of all possible questions, chosen by hash: never used for training."""
    return int(hashlib.sha1(question.encode()).hexdigest(), 16) % 10 == 0


def split(n_train: int, n_test: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Training and test problems whose questions never coincide (see :func:`is_test_question`)."""
    pool = generate(int(1.3 * (n_train + 10 * n_test)), seed)
    train = [p for p in pool if not is_test_question(p.question)][:n_train]
    test = [p for p in pool if is_test_question(p.question)][:n_test]
    return train, test


def extract_answer(text: str) -> int | None:
    """The integer after the first ``####`` in a generated solution, or None."""
    match = ANSWER.search(text)
    return int(match.group(1)) if match else None
