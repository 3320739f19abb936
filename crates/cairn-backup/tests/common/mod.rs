//! Helpers shared by the backup tests.
#![allow(dead_code)]

pub mod garage;
