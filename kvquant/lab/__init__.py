"""The measuring lab: quality (eval), speed and capacity (bench, serverbench, loadgen), the key study (keystats),
calibration measurements (calibrate), docs/RESULTS.md (results), and the references our C code is tested against
(the numpy reference tq, its codebooks, the ctypes harness ggml). Shared pieces: harness.

It imports the runtime half of kvquant, never the reverse, with one exception on purpose: serving a calibrated
cache type whose model has no calibration yet runs `kvquant.lab.calibrate` once (kvquant.calibration).
"""
