//! A role's settings reach exactly the machines the role selects: changing
//! them rebuilds and re-activates those machines and leaves the others alone.

use super::support::{Fleet, generation_number};

const FRONT: [&str; 2] = ["front1", "front2"];
const BACK: [&str; 2] = ["back1", "back2"];

fn service(front_color: &str) -> String {
    format!(
        "apiVersion: converge/v1
kind: Service
metadata:
  name: site
spec:
  module: static-site
  settings: {{title: loop}}
  roles:
    front: {{tags: [front], settings: {{color: {front_color}}}}}
    back: {{tags: [back], settings: {{color: red}}}}
"
    )
}

#[test]
fn changing_one_roles_settings_rebuilds_and_activates_exactly_the_machines_it_selects() {
    let fleet = Fleet::new();
    for name in FRONT {
        fleet.write(
            &format!("{name}.yaml"),
            &fleet.machine(name, &["front"], &["v1"], ""),
        );
    }
    for name in BACK {
        fleet.write(
            &format!("{name}.yaml"),
            &fleet.machine(name, &["back"], &["v1"], ""),
        );
    }
    fleet.write("service.yaml", &service("blue"));
    fleet.reconcile_once(&[]).assert_code(0);

    let all = FRONT.iter().chain(BACK.iter());
    let before: Vec<(String, Vec<String>, usize)> = all
        .clone()
        .map(|name| {
            (
                fleet.assert_current_complete(name),
                fleet.ledger(name),
                fleet.builds(name),
            )
        })
        .collect();
    for (name, (_, ledger, builds)) in all.clone().zip(&before) {
        assert_eq!(*builds, 1, "{name} built once");
        assert_eq!(ledger.len(), 2, "{name} activated once: {ledger:?}");
    }

    fleet.write("service.yaml", &service("green"));
    fleet.reconcile_once(&[]).assert_code(0);

    for (name, (generation, ledger, builds)) in all.zip(&before) {
        let now = fleet.assert_current_complete(name);
        if FRONT.contains(name) {
            assert_eq!(
                fleet.builds(name),
                builds + 1,
                "{name} is selected by the changed role: rebuilt once"
            );
            assert_eq!(
                generation_number(&now),
                generation_number(generation) + 1,
                "{name} got a new generation"
            );
            assert_eq!(
                &fleet.ledger(name)[ledger.len()..],
                [
                    format!("start {now} switch v1"),
                    format!("end {now} switch v1")
                ],
                "{name} activated its new generation once"
            );
            let roles = std::fs::read_to_string(
                fleet
                    .machine_dir(name)
                    .join("generations")
                    .join(&now)
                    .join("roles.json"),
            )
            .expect("the generation holds its roles document");
            assert!(
                roles.contains("green") && !roles.contains("blue"),
                "{name}'s roles document carries the new settings: {roles}"
            );
        } else {
            assert_eq!(fleet.builds(name), *builds, "{name} must not be rebuilt");
            assert_eq!(&now, generation, "{name} keeps its generation");
            assert_eq!(
                &fleet.ledger(name),
                ledger,
                "{name} must not be re-activated"
            );
        }
    }
}
