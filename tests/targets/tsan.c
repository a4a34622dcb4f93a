/* ThreadSanitizer fixture: two threads increment one counter without a lock. */
#include <pthread.h>

static int counter;

__attribute__((noinline)) static void bump(void) { counter++; /* data race */ }

static void *worker(void *arg) {
    (void)arg;
    bump();
    return 0;
}

int main(void) {
    pthread_t a, b;
    pthread_create(&a, 0, worker, 0);
    pthread_create(&b, 0, worker, 0);
    pthread_join(a, 0);
    pthread_join(b, 0);
    return 0;
}
