"""The tools, on top of everything else: the benchmark (:mod:`.bench`), the quality metrics and
report (:mod:`.quality`, :mod:`.quality_report`, :mod:`.stats` for bootstrap intervals), the
quality study (:mod:`.study`, :mod:`.study_report`) and the schedules it calibrates
(:mod:`.candidates`), the tuner (:mod:`.tune`, ``cc.tune``), the peers run beside us
(:mod:`.peers`), plots, FLOP counting (:mod:`.flops`), the model zoo and its training scripts
(:mod:`.zoo`), the one schedule-spec grammar (:mod:`.specs`) and the command line (:mod:`.cli`)."""
