//! End-to-end tests: real processes, real guests, real peers. The tests live
//! in `tests/tests/`; the harness they share with the benchmarks is
//! `test-infra` (`tests/infra/`).
