//! Host integration tests: placeholder replaced below.
