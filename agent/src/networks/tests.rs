//! The run networks against the local Docker engine.

use std::process::Command;

use super::*;
use crate::registry::RegistryAuths;

fn docker(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn networks_of(agent: &str) -> Vec<String> {
    let filter = format!("label=cimaster.agent={agent}");
    let mut names: Vec<String> =
        docker(&["network", "ls", "--filter", &filter, "--format", "{{.Name}}"]).lines().map(str::to_owned).collect();
    names.sort();
    names
}

fn labels(agent: &str) -> RunLabels {
    RunLabels { agent: agent.to_owned(), job: "net".to_owned(), run: uuid::Uuid::new_v4().to_string(), attempt: 1 }
}

#[tokio::test]
async fn an_empty_network_is_lent_again_and_an_occupied_one_is_removed() {
    let agent = format!("networks-{}", uuid::Uuid::new_v4().simple());
    let docker_client = DockerClient::connect(RegistryAuths::default()).await.unwrap();
    // Long enough for the listing below to see both before the older one goes, on a loaded machine.
    let linger = Duration::from_secs(2);
    let networks = Arc::new(Networks::new(docker_client, agent.clone(), 1, None).lingering_for(linger));

    let first = networks.take(&labels(&agent)).await.unwrap();
    let second = networks.take(&labels(&agent)).await.unwrap();
    assert_ne!(first.name, second.name, "two runs at once share a network");
    let (first_name, second_name) = (first.name.clone(), second.name.clone());
    networks.give_back(first, true).await;
    networks.give_back(second, true).await;
    // One more than the one kept: both stay a while for the next runs, then the older one goes.
    let mut both = vec![first_name.clone(), second_name.clone()];
    both.sort();
    assert_eq!(networks_of(&agent), both);
    let deadline = Instant::now() + Duration::from_secs(20);
    while networks_of(&agent).len() > 1 {
        assert!(Instant::now() < deadline, "the surplus network stayed: {:?}", networks_of(&agent));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(networks_of(&agent), vec![second_name.clone()]);
    let first_name = second_name;

    // The next run gets the idle network.
    let again = networks.take(&labels(&agent)).await.unwrap();
    assert_eq!(again.name, first_name);

    // Something still attached (a container whose removal failed): never lent again.
    let container = format!("{agent}-left");
    docker(&[
        "run",
        "-d",
        "--name",
        &container,
        "--label",
        &format!("cimaster.agent={agent}"),
        "--network",
        &again.name,
        "busybox:latest",
        "sleep",
        "60",
    ]);
    networks.give_back(again, true).await;
    let next = networks.take(&labels(&agent)).await.unwrap();
    assert_ne!(next.name, first_name, "a network with a container on it was lent again");
    docker(&["rm", "-f", &container]);
    docker(&["network", "rm", &first_name]);

    // An idle network removed behind the agent's back is not lent.
    networks.give_back(next, true).await;
    let idle = networks_of(&agent);
    assert_eq!(idle.len(), 1);
    docker(&["network", "rm", &idle[0]]);
    let fresh = networks.take(&labels(&agent)).await.unwrap();
    assert_ne!(fresh.name, idle[0]);
    assert_eq!(networks_of(&agent), vec![fresh.name.clone()]);

    // A graceful stop removes the idle networks.
    networks.give_back(fresh, true).await;
    assert_eq!(networks_of(&agent).len(), 1);
    networks.clear().await;
    assert!(networks_of(&agent).is_empty(), "{:?}", networks_of(&agent));
}

fn sandboxes_of(agent: &str) -> Vec<String> {
    let filter = format!("label=cimaster.agent={agent}");
    docker(&["ps", "-aq", "--no-trunc", "--filter", &filter, "--filter", "label=cimaster.sandbox"])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_kept_network_keeps_its_sandbox_and_both_go_when_a_run_left_something() {
    let agent = format!("networks-{}", uuid::Uuid::new_v4().simple());
    let docker_client = DockerClient::connect(RegistryAuths::default()).await.unwrap();
    let networks =
        Arc::new(Networks::new(docker_client, agent.clone(), 1, None).with_sandboxes("busybox:latest".to_owned()));

    let first = networks.take(&labels(&agent)).await.unwrap();
    let sandbox = first.sandbox.clone().expect("a kept network has a sandbox");
    assert_eq!(sandbox.network_mode(), format!("container:{}", sandbox.id));
    assert_eq!(sandboxes_of(&agent), vec![sandbox.id.clone()]);
    // The namespace's files, for the runs to get read-only.
    let targets: Vec<&str> = sandbox.files.iter().map(|(_, target)| *target).collect();
    assert_eq!(targets, ["/etc/hosts", "/etc/resolv.conf", "/etc/hostname"]);
    let hosts = docker(&["inspect", "-f", "{{.HostsPath}}", &sandbox.id]);
    assert_eq!(sandbox.binds().next(), Some(format!("{hosts}:/etc/hosts:ro")));
    let on_network = docker(&["network", "inspect", &first.name, "--format", "{{len .Containers}}"]);
    assert_eq!(on_network, "1", "the sandbox is on the network");
    let name = first.name.clone();
    networks.give_back(first, true).await;

    // The next run gets the network with the same sandbox.
    let again = networks.take(&labels(&agent)).await.unwrap();
    assert_eq!((&again.name, again.sandbox.as_ref()), (&name, Some(&sandbox)));
    // A run that left a container behind: the network and its sandbox go.
    networks.give_back(again, false).await;
    assert!(networks_of(&agent).is_empty() && sandboxes_of(&agent).is_empty());

    // A sandbox stopped behind the agent's back: its network is not lent again.
    let third = networks.take(&labels(&agent)).await.unwrap();
    let third_name = third.name.clone();
    docker(&["rm", "-f", &third.sandbox.as_ref().unwrap().id]);
    networks.give_back(third, true).await;
    let fourth = networks.take(&labels(&agent)).await.unwrap();
    assert_ne!(fourth.name, third_name);
    assert_eq!(networks_of(&agent), vec![fourth.name.clone()]);
    assert_eq!(sandboxes_of(&agent).len(), 1);

    // A graceful stop removes the idle networks with their sandboxes.
    networks.give_back(fourth, true).await;
    networks.clear().await;
    assert!(networks_of(&agent).is_empty() && sandboxes_of(&agent).is_empty());
}

/// A registry on loopback that takes connections and never answers, counting them.
async fn silent_registry() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((connection, _)) = listener.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(connection);
        }
    });
    (address, connections)
}

/// A sandbox image that cannot be had holds a new network up for no longer than the wait, and the
/// next new networks go without sandboxes at once rather than each asking for it again.
#[tokio::test]
async fn without_its_image_a_network_goes_without_a_sandbox_and_the_image_is_not_asked_for_again() {
    let agent = format!("networks-{}", uuid::Uuid::new_v4().simple());
    let (registry, connections) = silent_registry().await;
    let docker_client = DockerClient::connect(RegistryAuths::default()).await.unwrap();
    let networks = Arc::new(
        Networks::new(docker_client, agent.clone(), 2, None)
            .with_sandboxes(format!("{registry}/cimaster-test/sandbox:1"))
            .waiting_for_sandbox_image_up_to(Duration::from_secs(1)),
    );
    let bounded = Duration::from_secs(30);

    let first = tokio::time::timeout(bounded, networks.take(&labels(&agent))).await.unwrap().unwrap();
    assert!(first.sandbox.is_none(), "a sandbox without its image");
    let asked = connections.load(std::sync::atomic::Ordering::SeqCst);
    assert!(asked >= 1, "the engine never asked the registry for the image");
    let second = tokio::time::timeout(bounded, networks.take(&labels(&agent))).await.unwrap().unwrap();
    assert!(second.sandbox.is_none());
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), asked, "the image was asked for again");

    networks.give_back(first, true).await;
    networks.give_back(second, true).await;
    networks.clear().await;
    assert!(networks_of(&agent).is_empty());
}

#[tokio::test]
async fn with_none_kept_each_run_gets_its_own_network_removed_after_it() {
    let agent = format!("networks-{}", uuid::Uuid::new_v4().simple());
    let networks =
        Arc::new(Networks::new(DockerClient::connect(RegistryAuths::default()).await.unwrap(), agent.clone(), 0, None));
    let run = labels(&agent);
    let network = networks.take(&run).await.unwrap();
    let filter = format!("label=cimaster.run={}", run.run);
    assert_eq!(docker(&["network", "ls", "--filter", &filter, "--format", "{{.Name}}"]), network.name);
    networks.give_back(network, true).await;
    assert!(networks_of(&agent).is_empty());
}

#[tokio::test]
async fn networks_take_free_subnets_of_the_pool_and_say_when_none_is_left() {
    let agent = format!("networks-{}", uuid::Uuid::new_v4().simple());
    // Two /27 blocks in a range of this test's own; another network already holds one of them.
    let third = uuid::Uuid::new_v4().as_bytes()[0];
    let range = format!("10.241.{third}.0/26");
    let foreign = format!("{agent}-foreign");
    let taken = format!("10.241.{third}.0/27");
    assert!(!docker(&["network", "create", "--subnet", &taken, &foreign]).is_empty(), "cannot create {taken}");
    let pool: SubnetPool = range.parse().unwrap();
    // Told not to wait, it says at once that none is left.
    let networks = Arc::new(
        Networks::new(DockerClient::connect(RegistryAuths::default()).await.unwrap(), agent.clone(), 0, Some(pool))
            .waiting_up_to(Duration::ZERO),
    );

    let first = networks.take(&labels(&agent)).await.unwrap();
    let subnet = docker(&["network", "inspect", &first.name, "--format", "{{(index .IPAM.Config 0).Subnet}}"]);
    assert!(subnet.starts_with(&format!("10.241.{third}.")), "{subnet} is outside {range}");
    assert_eq!(subnet, format!("10.241.{third}.32/27"), "the taken block is skipped");
    let second = networks.take(&labels(&agent)).await;
    let exhausted = matches!(second, Err(DockerError::SubnetsExhausted(2)));
    if let Ok(network) = second {
        networks.give_back(network, true).await;
    }
    assert_eq!(networks.limit(), Some(1), "it learnt how many networks it can have");
    networks.give_back(first, true).await;
    docker(&["network", "rm", &foreign]);
    assert!(exhausted, "with one block taken and one in use, none is left");
    assert!(networks_of(&agent).is_empty());
}

#[tokio::test]
async fn a_run_waits_for_a_network_to_come_back_and_no_more_are_admitted_meanwhile() {
    let agent = format!("networks-{}", uuid::Uuid::new_v4().simple());
    // One /27 block: one network at a time.
    let third = uuid::Uuid::new_v4().as_bytes()[0];
    let pool: SubnetPool = format!("10.243.{third}.0/27").parse().unwrap();
    let docker_client = DockerClient::connect(RegistryAuths::default()).await.unwrap();
    let networks = Arc::new(Networks::new(docker_client, agent.clone(), 0, Some(pool)));
    let (one, two) = (networks.admit().unwrap(), networks.admit().unwrap());
    let first = networks.take(&labels(&agent)).await.unwrap();
    // The second run finds none, learns the limit, and waits for the first's network.
    let waiting = {
        let networks = networks.clone();
        let agent = agent.clone();
        tokio::spawn(async move { networks.take(&labels(&agent)).await })
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while networks.limit().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the limit is learnt");
    assert!(networks.admit().is_none(), "a third run is admitted with no network for it");
    networks.give_back(first, true).await;
    drop(one);
    let second = tokio::time::timeout(Duration::from_secs(30), waiting).await.unwrap().unwrap().unwrap();
    networks.give_back(second, true).await;
    drop(two);
    assert!(networks_of(&agent).is_empty());
}
