//! Task events to containerd (TaskCreate, TaskStart, TaskExit, ...),
//! published in order from a thread of their own, so that no RPC waits on
//! containerd's event service.

use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::publisher::RemotePublisher;
use crossbeam_channel::Sender;

type Event = (&'static str, Box<dyn MessageDyn>);

#[derive(Clone)]
pub struct Events {
    tx: Sender<Event>,
}

impl Events {
    pub fn start(publisher: RemotePublisher, namespace: String) -> Events {
        let (tx, rx) = crossbeam_channel::unbounded::<Event>();
        std::thread::spawn(move || {
            for (topic, event) in rx {
                if let Err(e) = publisher.publish(Default::default(), topic, &namespace, event) {
                    tracing::warn!("publishing {topic}: {e}");
                }
            }
        });
        Events { tx }
    }

    pub fn send(&self, topic: &'static str, event: impl MessageDyn) {
        let _ = self.tx.send((topic, Box::new(event)));
    }
}
