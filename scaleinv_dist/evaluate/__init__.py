"""Long-context evaluation (docs/evaluation.md).

    lengths        validation loss at several context lengths and by log-spaced position bucket
    niah           needle-in-a-haystack: context builder, teacher-forced and greedy scoring, the grid
    niah_finetune  the optional short fine-tune on needle tasks
    sweep          train + evaluate every attention method, one table and one plot
    distributed    context parallelism for evaluation lengths beyond one device
    data_access    what evaluation needs from scaleinv_dist.data
    plots, report  PNG figures; text / markdown tables and metrics records
    common         devices, autocast, length parsing, metrics.jsonl helpers
    errors         EvalError, the evaluation commands' user mistakes
"""
