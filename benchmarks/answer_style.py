"""How a question/answer file's answers read, in the figures that decide what ROUGE-L can reward.

For each data file (read and normalised by the library, as ``run.py`` reads it) it prints:

- ``answer vs question``: mean ROUGE-L F1 of each answer against its own question: how far answers
  restate the question's words, as a direct answer does ("Stoicism says that losing your job ...");
- ``answer vs same-school answer``: mean ROUGE-L F1 of each answer against one other answer of the same
  school, drawn with ``random.Random(seed)``: how much wording a school's answers share whatever the
  question (voice, set phrases), the part of a reference a model can learn without knowing its content;
- ``words``: mean whitespace-separated words per answer;
- the most common first two words of answers.

ROUGE-L is Lin (2004), computed by Google's ``rouge_score`` with the Porter stemmer, as the library's
metrics are. Records without a school are left out of the same-school figure.

    .venv/bin/python benchmarks/answer_style.py example_data/philosophy_qa.jsonl ../shared/data/phillm/main_data.json
"""

import argparse
import random
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def answer_style(data_path: str, seed: int = 0) -> dict:
    """The figures above for one data file; raises the library's loading errors for a bad file."""
    from rouge_score import rouge_scorer

    from philo_dataflow.lib.records import read_records
    from philo_dataflow.stages.loading import instruction_records

    records = instruction_records(read_records(data_path), data_path, None)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rng = random.Random(seed)
    by_school: dict = {}
    for index, record in enumerate(records):
        if record["category"]:
            by_school.setdefault(record["category"], []).append(index)
    against_question, against_school = [], []
    for index, record in enumerate(records):
        against_question.append(scorer.score(record["output_text"], record["input_text"])["rougeL"].fmeasure)
        others = [other for other in by_school.get(record["category"], []) if other != index]
        if others:
            other = records[rng.choice(others)]["output_text"]
            against_school.append(scorer.score(record["output_text"], other)["rougeL"].fmeasure)
    openings = Counter(" ".join(record["output_text"].split()[:2]) for record in records)
    return {
        "data_path": data_path,
        "records": len(records),
        "answer_vs_question": statistics.mean(against_question),
        "answer_vs_same_school_answer": statistics.mean(against_school) if against_school else None,
        "words": statistics.mean(len(record["output_text"].split()) for record in records),
        "common_openings": openings.most_common(5),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_paths", nargs="+", help="data files, in any format run.py reads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the same-school draw")
    args = parser.parse_args(argv)
    print("| data | records | answer vs question | answer vs same-school answer | words | commonest openings |")
    print("|---|---|---|---|---|---|")
    for path in args.data_paths:
        style = answer_style(path, args.seed)
        school = style["answer_vs_same_school_answer"]
        openings = ", ".join(f"{text!r} {count}" for text, count in style["common_openings"])
        print(f"| `{path}` | {style['records']} | {style['answer_vs_question']:.3f} | "
              f"{'—' if school is None else f'{school:.3f}'} | {style['words']:.1f} | {openings} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
