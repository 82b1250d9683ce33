"""The tools, on top of everything else: the benchmark (:mod:`.bench`), the quality metrics and
report (:mod:`.quality`, :mod:`.quality_report`), the peers run beside us (:mod:`.peers`), plots,
FLOP counting (:mod:`.flops`), the model zoo and its training scripts (:mod:`.zoo`), the one
schedule-spec grammar (:mod:`.specs`) and the command line (:mod:`.cli`)."""
