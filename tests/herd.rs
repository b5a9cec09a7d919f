//! The default backoff spreads a herd: 1,000 clients dropped at once by a server that comes
//! back after 50 ms, or after 2 s. The busiest 50 ms window holds at most 10 % of the
//! reconnect attempts.
//!
//! The same simulation, with its figures, is `cargo bench --bench herd`.

#[path = "../benches/support/herd.rs"]
mod herd_sim;

use std::time::Duration;

use herd_sim::{Herd, simulate, simulate_with};
use tower::retry::backoff::ExponentialBackoffMaker;
use tower::util::rng::HasherRng;

fn check(herd: Herd, down: Duration) {
    let share = herd.busiest_share(Duration::from_millis(50));
    assert!(
        share <= 0.10,
        "server back after {down:?}: {:.1} % of {} attempts in the busiest 50 ms window",
        share * 100.0,
        herd.attempts.len()
    );
    assert_eq!(herd.connected, herd_sim::CLIENTS, "every client came back");
}

#[tokio::test(start_paused = true)]
async fn the_default_backoff_spreads_a_herd_when_the_server_is_back_after_50_ms() {
    let down = Duration::from_millis(50);
    check(simulate(down).await, down);
}

#[tokio::test(start_paused = true)]
async fn the_default_backoff_spreads_a_herd_when_the_server_is_back_after_2_s() {
    let down = Duration::from_secs(2);
    check(simulate(down).await, down);
}

/// The check can fail: the crate's earlier default, tower's `ExponentialBackoffMaker` from
/// 100 ms with 50 % jitter added to a fixed delay, bunches the first retries in 50 ms.
#[tokio::test(start_paused = true)]
async fn jitter_added_to_a_fixed_delay_does_not_spread_the_herd() {
    let down = Duration::from_millis(50);
    let tower_default = ExponentialBackoffMaker::new(
        Duration::from_millis(100),
        Duration::from_secs(30),
        0.5,
        HasherRng::default(),
    )
    .unwrap();
    let share = simulate_with(down, tower_default)
        .await
        .busiest_share(Duration::from_millis(50));
    assert!(share > 0.5, "{:.1} %", share * 100.0);
}

#[test]
fn the_busiest_window_slides() {
    let ms = Duration::from_millis;
    let herd = Herd {
        attempts: [0, 10, 40, 60, 70, 89, 200].map(ms).to_vec(),
        connected: 0,
        all_back: ms(0),
    };
    // 40..90 holds 40, 60, 70 and 89.
    assert!((herd.busiest_share(ms(50)) - 4.0 / 7.0).abs() < 1e-9);
    assert!((herd.busiest_share(ms(1)) - 1.0 / 7.0).abs() < 1e-9);
}
