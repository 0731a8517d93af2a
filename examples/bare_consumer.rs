//! Baseline for the end-to-end ingest figure: how fast a bare rdkafka consumer (no decoding, no
//! store) reads a topic from the same broker. Reads every partition from the beginning until
//! `count` messages arrived, then prints messages/s.
//!
//! ```text
//! cargo run --release --example bare_consumer -- BOOTSTRAP TOPIC COUNT
//! ```

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, bootstrap, topic, count] = args.as_slice() else {
        eprintln!("usage: bare_consumer BOOTSTRAP TOPIC COUNT");
        std::process::exit(2);
    };
    let count: u64 = count.parse().expect("COUNT is a number");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "bare-consumer-baseline")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .create()
            .expect("consumer");
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for p in md.topics()[0].partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let mut n = 0u64;
        let mut bytes = 0usize;
        let mut start = None;
        while n < count {
            let m = consumer.recv().await.expect("consume");
            start.get_or_insert_with(Instant::now);
            bytes += m.payload().map_or(0, <[u8]>::len);
            n += 1;
        }
        let secs = start.unwrap().elapsed().as_secs_f64();
        println!(
            "{{\"messages\":{n},\"bytes\":{bytes},\"seconds\":{secs:.3},\"messages_per_sec\":{:.0}}}",
            n as f64 / secs
        );
    });
}
