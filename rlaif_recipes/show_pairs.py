"""Print a few generated response pairs: `python -m rlaif_recipes.show_pairs OUTPUT_DIR [N]`."""

import sys

from rlaif_recipes.recipes.generate_pairs import load_generated


def main(output_dir: str, count: int = 3) -> None:
    pairs = load_generated(output_dir)
    print(f"{len(pairs)} prompts with {len(pairs[0]['responses'])} responses each in {output_dir}/data")
    for row in pairs.select(range(min(count, len(pairs)))):
        print(f"\nprompt: {row['prompt']}")
        for i, response in enumerate(row["responses"]):
            print(f"  [{i}] {response[:160]!r}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
