from jit_tune.data import builtin_tasks as bt


def test_suite_has_ten_tasks_with_four_templates_and_held_out_ones():
    assert len(bt.TASKS) >= 10
    for task in bt.TASKS:
        assert len(task.templates) + len(task.held_out_templates) >= 4
        assert task.templates and task.held_out_templates
        assert not set(task.templates) & set(task.held_out_templates)


def test_examples_are_deterministic_in_the_seed():
    task = bt.TASKS_BY_NAME["sort"]
    assert bt.make_example(task, "train", 5, seed=0) == bt.make_example(task, "train", 5, seed=0)
    assert bt.make_example(task, "train", 5, seed=0) != bt.make_example(task, "train", 5, seed=1)


def _words(example):
    return example["messages"][0]["content"]


def test_train_and_validation_never_share_an_input():
    inputs = {}
    for split in bt.SPLITS:
        inputs[split] = set()
        for task in bt.TASKS:
            for i in range(200):
                example = bt.make_example(task, split, i, seed=0)
                template = task.template(example["template_id"])
                prefix, _, suffix = template.partition("{words}")
                inputs[split].add(_words(example)[len(prefix): len(_words(example)) - len(suffix)])
    assert inputs["train"] and inputs["validation"]
    assert not inputs["train"] & inputs["validation"]


def test_instruction_not_input_decides_the_answer():
    words = ["owl", "cake", "owl", "bird"]
    answers = {task.name: task.answer(words) for task in bt.TASKS}
    assert answers["reverse"] == "bird owl cake owl"
    assert answers["sort"] == "bird cake owl owl"
    assert answers["count"] == "4" and answers["count_unique"] == "3"
    assert answers["dedupe"] == "owl cake bird"
    assert answers["uppercase"] == "OWL CAKE OWL BIRD"
    assert answers["has_duplicates"] == "yes"
    assert len(set(answers.values())) == len(answers)


def test_held_out_examples_use_only_held_out_templates():
    for task in bt.TASKS:
        for i in range(20):
            assert task.is_held_out(bt.make_example(task, "validation", i, 0, held_out=True)["template_id"])
            assert not task.is_held_out(bt.make_example(task, "train", i, 0)["template_id"])
