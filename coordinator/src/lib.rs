//! shardline coordinator (issue 4).
