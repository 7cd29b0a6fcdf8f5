"""Operations tools around a run, outside the workflow's rules: machine checks (doctor), GPU-hour plans and
their cost floor, throughput calibration, the paper-config rehearsal, the fused-kernel build and the
environment files. They use the engine; reporting never imports them."""
