"""Tasks: the synthetic arithmetic task the embedded model is trained on, and the evaluation tasks
of the paper's Table 1 (`registry.get_task`: gsm8k_cot, math500, humaneval, mbpp, arithmetic)
with their data loading, grading, code sandbox, oracle check and result records."""
