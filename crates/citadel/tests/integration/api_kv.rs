use serde_json::json;

use crate::harness::Node1;

#[tokio::test]
async fn kv_writes_create_versions_honour_cas_and_prune_past_max_versions() {
    let node = Node1::start(21100).await;
    let root = node.root();
    assert_eq!(root.kv_put("secret", "app/db", &json!({ "pw": "one" }), None).await.unwrap(), 1);
    assert_eq!(root.kv_put("secret", "app/db", &json!({ "pw": "two" }), None).await.unwrap(), 2);
    assert_eq!(root.kv_get("secret", "app/db", Some(1)).await.unwrap(), json!({ "pw": "one" }));
    assert_eq!(root.kv_get("secret", "app/db", None).await.unwrap(), json!({ "pw": "two" }));

    let stale = root.kv_put("secret", "app/db", &json!({ "pw": "x" }), Some(1)).await.unwrap_err();
    assert_eq!(stale.status().unwrap(), 400);
    assert!(stale.to_string().contains("check-and-set"));
    assert_eq!(root.kv_put("secret", "app/db", &json!({ "pw": "three" }), Some(2)).await.unwrap(), 3);
    assert_eq!(root.kv_put("secret", "fresh", &json!({ "a": "1" }), Some(0)).await.unwrap(), 1);

    root.post("secret/config", &json!({ "max_versions": 2, "cas_required": true })).await.unwrap();
    assert_eq!(root.get("secret/config").await.unwrap()["data"]["max_versions"], json!(2));
    let no_cas = root.kv_put("secret", "app/db", &json!({ "pw": "4" }), None).await.unwrap_err();
    assert!(no_cas.to_string().contains("check-and-set parameter required"), "{no_cas}");
    assert_eq!(root.kv_put("secret", "app/db", &json!({ "pw": "four" }), Some(3)).await.unwrap(), 4);
    let meta = root.get("secret/metadata/app/db").await.unwrap();
    assert_eq!(meta["data"]["current_version"], json!(4));
    assert_eq!(meta["data"]["oldest_version"], json!(3));
    assert_eq!(meta["data"]["versions"].as_object().unwrap().len(), 2);
    assert_eq!(root.raw("GET", "secret/data/app/db?version=1", None, &[]).await.unwrap().status, 404);
}

#[tokio::test]
async fn kv_soft_delete_undelete_destroy_and_metadata_behave_as_vault() {
    let node = Node1::start(21110).await;
    let root = node.root();
    for v in ["a", "b", "c"] {
        root.kv_put("secret", "s", &json!({ "v": v }), None).await.unwrap();
    }
    root.delete("secret/data/s").await.unwrap();
    let gone = root.raw("GET", "secret/data/s", None, &[]).await.unwrap();
    assert_eq!(gone.status, 404);
    assert_eq!(gone.body["data"]["data"], json!(null));
    assert_ne!(gone.body["data"]["metadata"]["deletion_time"], json!(""));
    root.post("secret/undelete/s", &json!({ "versions": [3] })).await.unwrap();
    assert_eq!(root.kv_get("secret", "s", None).await.unwrap(), json!({ "v": "c" }));

    root.post("secret/delete/s", &json!({ "versions": [1] })).await.unwrap();
    root.post("secret/destroy/s", &json!({ "versions": [2] })).await.unwrap();
    let meta = root.get("secret/metadata/s").await.unwrap()["data"].clone();
    assert_eq!(meta["versions"]["2"]["destroyed"], json!(true));
    assert_ne!(meta["versions"]["1"]["deletion_time"], json!(""));
    root.post("secret/undelete/s", &json!({ "versions": [2] })).await.unwrap();
    assert_eq!(
        root.raw("GET", "secret/data/s?version=2", None, &[]).await.unwrap().status,
        404,
        "destroyed stays destroyed"
    );
    let missing = root.post("secret/destroy/s", &json!({})).await.unwrap_err();
    assert_eq!(missing.status().unwrap(), 400);

    root.post("secret/metadata/s", &json!({ "max_versions": 5, "custom_metadata": { "owner": "ops" } })).await.unwrap();
    let meta = root.get("secret/metadata/s").await.unwrap()["data"].clone();
    assert_eq!(meta["max_versions"], json!(5));
    assert_eq!(meta["custom_metadata"]["owner"], json!("ops"));
    let bad = root.post("secret/metadata/s", &json!({ "max_versions": "many" })).await.unwrap_err();
    assert_eq!(bad.status().unwrap(), 400);

    root.delete("secret/metadata/s").await.unwrap();
    assert_eq!(root.raw("GET", "secret/metadata/s", None, &[]).await.unwrap().status, 404);
    assert_eq!(
        root.kv_put("secret", "s", &json!({ "v": "new" }), None).await.unwrap(),
        1,
        "delete-all restarts versions"
    );
}

#[tokio::test]
async fn kv_list_works_with_the_list_method_and_list_query() {
    let node = Node1::start(21120).await;
    let root = node.root();
    for p in ["app/db", "app/web/tls", "other"] {
        root.kv_put("secret", p, &json!({ "k": "v" }), None).await.unwrap();
    }
    assert_eq!(root.list("secret/metadata/").await.unwrap(), vec!["app/", "other"]);
    assert_eq!(root.list("secret/metadata/app").await.unwrap(), vec!["db", "web/"]);
    let by_query = root.get("secret/metadata/app/?list=true").await.unwrap();
    assert_eq!(by_query["data"]["keys"], json!(["db", "web/"]));
    assert_eq!(root.raw("LIST", "secret/metadata/nothing", None, &[]).await.unwrap().status, 404);
}

#[tokio::test]
async fn kv_patch_merges_into_the_latest_version() {
    let node = Node1::start(21130).await;
    let root = node.root();
    root.kv_put("secret", "p", &json!({ "a": "1", "b": "2" }), None).await.unwrap();
    let r = root.raw("PATCH", "secret/data/p", Some(&json!({ "data": { "b": null, "c": "3" } })), &[]).await.unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["data"]["version"], json!(2));
    assert_eq!(root.kv_get("secret", "p", None).await.unwrap(), json!({ "a": "1", "c": "3" }));
    let missing = root.raw("PATCH", "secret/data/none", Some(&json!({ "data": { "a": "1" } })), &[]).await.unwrap();
    assert_eq!(missing.status, 404);
}

#[tokio::test]
async fn stale_reads_are_served_on_request() {
    let node = Node1::start(21140).await;
    let root = node.root();
    root.kv_put("secret", "s", &json!({ "v": "1" }), None).await.unwrap();
    let r = root.raw("GET", "secret/data/s", None, &[("X-Citadel-Consistency", "stale")]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body["data"]["data"], json!({ "v": "1" }));
    let q = root.raw("GET", "secret/data/s?stale=true", None, &[]).await.unwrap();
    assert_eq!(q.body["data"]["data"], json!({ "v": "1" }));
}
